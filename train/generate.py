"""``wurst-generate``: images from a pipeline directory and prompts (the C → B → A cascade).

    wurst-generate outputs/tiny --prompt "a red circle on a blue background" --out samples/
    wurst-generate outputs/paper_v2 --prompts-file prompts.txt --height 1024 --width 1024

Seeds are per prompt (seed + prompt index), so an image does not depend on the batch it ran in.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch
from torchvision.utils import save_image
from tqdm.auto import tqdm

from wurst.train.cascade_loading import load_cascade


def read_prompts(prompts: list[str], prompts_file: str | None) -> list[str]:
    out = list(prompts or [])
    if prompts_file:
        path = Path(prompts_file)
        if not path.is_file():
            raise FileNotFoundError(f"--prompts-file {path} does not exist")
        out += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not out:
        raise ValueError("no prompts: pass --prompt TEXT (repeatable) or --prompts-file FILE (one per line)")
    return out


def slug(text: str, limit: int = 48) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit] or "prompt"


def generate(
    pipeline_dir: str | Path,
    prompts: list[str],
    out_dir: str | Path,
    height: int = 128,
    width: int = 128,
    seed: int = 0,
    batch_size: int = 4,
    sampler: str = "paper",
    device: str = "cpu",
    progress: bool = True,
) -> list[Path]:
    """Writes ``<out_dir>/<index>-<slug>.png`` for each prompt; returns the paths."""
    cascade = load_cascade(pipeline_dir, sampler=sampler, device=device, progress=False)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="generate", disable=not progress):
        chunk = prompts[start : start + batch_size]
        generators = [torch.Generator(device).manual_seed(seed + start + i) for i in range(len(chunk))]
        images = cascade(chunk, height, width, generator=generators)
        for i, (prompt, image) in enumerate(zip(chunk, images)):
            path = out_dir / f"{start + i:05d}-{slug(prompt)}.png"
            save_image(image, path)
            paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="wurst-generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("pipeline_dir", help="a pipeline directory with stage_a/, stage_b/, stage_c/ exports")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    parser.add_argument("--prompts-file", help="a text file, one prompt per line")
    parser.add_argument("--out", default=None, help="output folder (default: <pipeline_dir>/generated)")
    parser.add_argument("--height", type=int, default=128)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--sampler", default="paper", help="conf/sampler/<name>.yaml or a yaml path")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    prompts = read_prompts(args.prompt, args.prompts_file)
    out = args.out or str(Path(args.pipeline_dir) / "generated")
    paths = generate(args.pipeline_dir, prompts, out, args.height, args.width, args.seed, args.batch_size,
                     args.sampler, args.device)
    print(f"wrote {len(paths)} images to {out}")


if __name__ == "__main__":
    main()
