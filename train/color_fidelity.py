"""Has the tiny cascade learned? For prompts naming a background color, measure the color the
generated images actually show behind the shape and score it against the named one.

    python -m wurst.train.color_fidelity outputs/tiny [--per-color 4]

Background color of an image = the per-channel median over its outer border ring (the synthetic
shapes sit mostly inside); it is classified to the nearest color of the synthetic palette
(data/synthetic.py, 12 colors: chance is 1/12). Prints accuracy and chance as JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from wurst.data.synthetic import COLORS, SHAPES
from wurst.train.cascade_loading import load_cascade


def border_color(image: torch.Tensor, ring: float = 0.1) -> torch.Tensor:
    """image ``[3, H, W]`` in [0, 1] → median RGB over the outer ``ring`` fraction, ``[3]`` in 0..255."""
    _, h, w = image.shape
    k = max(1, round(min(h, w) * ring))
    mask = torch.ones(h, w, dtype=torch.bool)
    mask[k : h - k, k : w - k] = False
    return image[:, mask].median(dim=1).values * 255


def nearest_color(rgb: torch.Tensor) -> str:
    names = sorted(COLORS)
    palette = torch.tensor([COLORS[n] for n in names], dtype=torch.float32)
    return names[int(torch.cdist(rgb[None].float(), palette).argmin())]


def color_prompts(per_color: int, seed: int = 0) -> list[tuple[str, str]]:
    """(prompt, background color) pairs: every palette color as background, shapes and shape colors varied."""
    gen = torch.Generator().manual_seed(seed)
    names = sorted(COLORS)
    pairs = []
    for background in names:
        for _ in range(per_color):
            shape = SHAPES[int(torch.randint(len(SHAPES), (1,), generator=gen))]
            others = [n for n in names if n != background]
            fg = others[int(torch.randint(len(others), (1,), generator=gen))]
            article = "an" if fg[0] in "aeiou" else "a"
            pairs.append((f"{article} {fg} {shape} on a {background} background", background))
    return pairs


@torch.no_grad()
def color_fidelity(
    pipeline_dir: str | Path, per_color: int = 4, size: int = 128, sampler: str = "tiny", seed: int = 0,
    batch_size: int = 16,
) -> dict[str, Any]:
    cascade = load_cascade(pipeline_dir, sampler=sampler, progress=False)
    pairs = color_prompts(per_color, seed)
    hits = 0
    confusion: dict[str, dict[str, int]] = {}
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        generators = [torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))]
        images = cascade([p for p, _ in chunk], size, size, generator=generators)
        for (_, named), image in zip(chunk, images):
            seen = nearest_color(border_color(image))
            hits += seen == named
            confusion.setdefault(named, {}).setdefault(seen, 0)
            confusion[named][seen] += 1
    return {
        "background_color_accuracy": hits / len(pairs),
        "chance": 1 / len(COLORS),
        "images": len(pairs),
        "sampler": sampler,
        "confusion": confusion,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m wurst.train.color_fidelity", description=__doc__.split("\n\n")[0])
    parser.add_argument("pipeline_dir")
    parser.add_argument("--per-color", type=int, default=4)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--sampler", default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    result = color_fidelity(args.pipeline_dir, args.per_color, args.size, args.sampler, args.seed)
    print(json.dumps({k: v for k, v in result.items() if k != "confusion"}, indent=2))


if __name__ == "__main__":
    main()
