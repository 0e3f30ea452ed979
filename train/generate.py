"""``wurst-generate``: images from a pipeline directory and prompts (the C → B → A cascade).

    wurst-generate outputs/tiny --prompt "a red circle on a blue background" --out samples/
    wurst-generate outputs/paper_v2 --prompts-file prompts.txt --height 1024 --width 1024

Seeds are per prompt (seed + prompt index), so an image does not depend on the batch it ran in.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch
from torchvision.utils import save_image
from tqdm.auto import tqdm

from wurst.train.cascade_loading import load_cascade, sampler_config


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


def check_request(pipeline_dir: str | Path, out_dir: str | Path, height: int, width: int, batch_size: int,
                  sampler: str = "paper") -> None:
    """Everything about a generation request that can be wrong, checked before any weights load.

    The batch size, an ``--out`` that is (or lies under) a file, and the image size: the cascade's
    Stage B only runs at some sizes, so its network is built from the export's config on the meta
    device (no memory, no weights) and asked, with the sampler's hand-off constants.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"--batch-size {batch_size!r}: must be a positive number of prompts per batch")
    out_dir = Path(out_dir)
    for folder in (out_dir, *out_dir.parents):
        if folder.exists():
            if not folder.is_dir():
                where = f"--out {out_dir}" if folder == out_dir else f"--out {out_dir}: {folder}"
                raise NotADirectoryError(f"{where} is a file, not a folder; pass a folder for the images "
                                         "(it is created if missing)")
            break
    from wurst.models.cascade import CascadeSampler
    from wurst.train.export import build_from_config, read_config, require_export

    pipeline_dir = Path(pipeline_dir)
    networks = {}
    for stage in "abc":
        export_dir = require_export(pipeline_dir / f"stage_{stage}" / "export", stage,
                                    why="wurst-generate runs the C -> B -> A cascade")
        networks[f"stage_{stage}"] = build_from_config(read_config(export_dir), device="meta")
    settings = sampler_config(sampler) if isinstance(sampler, str) else dict(sampler)
    hand_off = pipeline_dir / "stage_c" / "export" / "hand_off.json"
    if hand_off.is_file():  # as load_cascade reads it
        settings.update(json.loads(hand_off.read_text()))
    sizes_only = CascadeSampler(**networks, text_encoder_c=None, text_encoder_b=None, **settings)
    sizes_only.latent_sizes(height, width)  # raises, naming the side and a size that works


def sampler_summary(name: str, cascade, negative_prompt: str | None) -> str:
    """One line with the settings the images are drawn with (steps, grids, guidance, hand-off)."""
    return f"sampler {name}: {cascade.describe()}; negative prompt {negative_prompt!r}"


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
    negative_prompt: str | None = None,
) -> list[Path]:
    """Writes ``<out_dir>/<index>-<slug>.png`` for each prompt; returns the paths.

    The request is checked (``check_request``) before the models load, and ``out_dir`` is created
    only when the first image is written: a refused or failed run leaves no empty folder behind.
    """
    check_request(pipeline_dir, out_dir, height, width, batch_size, sampler)
    cascade = load_cascade(pipeline_dir, sampler=sampler, device=device, progress=False)
    print(sampler_summary(sampler, cascade, negative_prompt), flush=True)
    out_dir = Path(out_dir)
    paths: list[Path] = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="generate", disable=not progress):
        chunk = prompts[start : start + batch_size]
        generators = [torch.Generator(device).manual_seed(seed + start + i) for i in range(len(chunk))]
        negatives = None if negative_prompt is None else [negative_prompt] * len(chunk)
        images = cascade(chunk, height, width, generator=generators, negative_prompts=negatives)
        out_dir.mkdir(parents=True, exist_ok=True)
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
    parser.add_argument("--negative-prompt", default=None,
                        help="what the guided stages steer away from (as diffusers' negative_prompt; default \"\")")
    parser.add_argument("--out", default=None, help="output folder (default: <pipeline_dir>/generated)")
    parser.add_argument("--height", type=int, default=128)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--sampler", default="paper", help="conf/sampler/<name>.yaml or a yaml path")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    out = args.out or str(Path(args.pipeline_dir) / "generated")
    try:
        prompts = read_prompts(args.prompt, args.prompts_file)
        check_request(args.pipeline_dir, out, args.height, args.width, args.batch_size, args.sampler)
    except (ValueError, OSError) as error:
        parser.error(str(error))
    paths = generate(args.pipeline_dir, prompts, out, args.height, args.width, args.seed, args.batch_size,
                     args.sampler, args.device, negative_prompt=args.negative_prompt)
    print(f"wrote {len(paths)} images to {out}")


if __name__ == "__main__":
    main()
