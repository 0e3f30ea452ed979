"""Does the tiny cascade draw what its prompt says? Background colour, foreground colour and shape
read from the *image* and scored against the prompt, at every stage of the cascade.

    python -m wurst.train.prompt_fidelity outputs/tiny [--hold-out 0.1] [--json out.json]

The reading (:func:`read_image`), with no learned parts:
  background  per-channel median of the outer border ring → nearest palette colour (data/synthetic.py)
  foreground  pixels farther than ``FOREGROUND_DISTANCE`` from the measured background (3×3 majority
              filter) → median colour → nearest palette colour other than the background
  shape       each of the 8 shapes is drawn (the writer's own ``draw_shape``) into the foreground
              mask's bounding box; the shape whose drawing overlaps the mask best (IoU) is the answer
Its accuracy on the synthetic writer's ground-truth pictures (JPEG round trip) is measured and
reported beside the figures (``reader``), so the figures below it are known to be about the model.

Per stage, on (foreground, shape, background) combinations the training shards never show
(``held_out_combinations``):
  stage_a   reconstruction PSNR of ground-truth pictures (and the reading of the reconstructions)
  stage_b   Stage B + A decoding the compressor latents of those pictures (with their captions): the
            ceiling a perfect prior would reach
  cascade   C → B → A from the prompts alone
Chance: background 1/12, foreground 1/11 (it differs from the background), shape 1/8, all three 1/1,056.
"""

from __future__ import annotations

import argparse
import io
import json
import random
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from wurst.data.synthetic import (
    COLORS,
    SHAPES,
    caption_of,
    draw_scene,
    draw_shape,
    held_out_combinations,
    read_manifest,
)
from wurst.data.topology import stream_seed

NAMES = sorted(COLORS)
PALETTE = torch.tensor([COLORS[n] for n in NAMES], dtype=torch.float32)
# Palette colours are ≥ 80 apart in RGB (gray–brown is the closest pair): farther than 60 from the background is foreground.
FOREGROUND_DISTANCE = 60.0
MIN_FOREGROUND = 0.01  # fraction of the image; less is "no shape drawn"
SCALES = (0.85, 0.92, 1.0, 1.08)  # radii tried around the box fit
CHANCE = {"background": 1 / len(NAMES), "foreground": 1 / (len(NAMES) - 1), "shape": 1 / len(SHAPES),
          "all_three": 1 / (len(NAMES) * (len(NAMES) - 1) * len(SHAPES))}
FIELDS = ("background", "foreground", "shape")


def nearest_color(rgb: torch.Tensor, exclude: str | None = None) -> str:
    """``[3]`` RGB in 0..255 → the nearest palette colour name (``exclude`` left out)."""
    distances = torch.cdist(rgb[None].float(), PALETTE)[0]
    if exclude is not None:
        distances[NAMES.index(exclude)] = float("inf")
    return NAMES[int(distances.argmin())]


@cache
def _unit_box(shape: str) -> tuple[float, float, float, float]:
    """The drawn extent of ``shape`` around its centre, in radii: (left, top, right, bottom)."""
    radius = 100.0
    canvas = Image.new("L", (400, 400), 0)
    draw_shape(ImageDraw.Draw(canvas), shape, (200.0, 200.0), radius, 255)
    ys, xs = np.nonzero(np.asarray(canvas))
    return ((xs.min() - 200) / radius, (ys.min() - 200) / radius, (xs.max() + 1 - 200) / radius,
            (ys.max() + 1 - 200) / radius)


def classify_shape(mask: np.ndarray) -> tuple[str, float]:
    """Foreground mask ``[H, W]`` bool → (best shape, its IoU): every shape drawn into the mask's box, at
    a few scales around it (a decoded image's edges are soft, so its box is only roughly the shape's)."""
    ys, xs = np.nonzero(mask)
    x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
    best, best_iou = SHAPES[0], -1.0
    for shape in SHAPES:
        left, top, right, bottom = _unit_box(shape)
        fitted = max((x1 - x0) / (right - left), (y1 - y0) / (bottom - top))
        for radius in (fitted * s for s in SCALES):
            center = (x0 - left * radius + ((x1 - x0) - (right - left) * radius) / 2,
                      y0 - top * radius + ((y1 - y0) - (bottom - top) * radius) / 2)
            canvas = Image.new("L", (mask.shape[1], mask.shape[0]), 0)
            draw_shape(ImageDraw.Draw(canvas), shape, center, radius, 255)
            drawn = np.asarray(canvas) > 127
            iou = (drawn & mask).sum() / max(1, (drawn | mask).sum())
            if iou > best_iou:
                best, best_iou = shape, float(iou)
    return best, best_iou


def _largest_component(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    labels, count = ndimage.label(mask)
    if count <= 1:
        return mask
    sizes = ndimage.sum(mask, labels, range(1, count + 1))
    return labels == (1 + int(np.argmax(sizes)))


def read_image(image: torch.Tensor, ring: float = 0.06) -> dict[str, Any]:
    """image ``[3, H, W]`` in [0, 1] → {"background", "foreground", "shape"} (None where nothing is drawn)."""
    rgb = image.detach().float().clamp(0, 1).cpu() * 255
    _, h, w = rgb.shape
    k = max(1, round(min(h, w) * ring))
    border = torch.ones(h, w, dtype=torch.bool)
    border[k : h - k, k : w - k] = False
    background_rgb = rgb[:, border].median(dim=1).values
    background = nearest_color(background_rgb)
    to_background = (rgb - background_rgb[:, None, None]).norm(dim=0)
    far = to_background > FOREGROUND_DISTANCE
    if far.float().mean() < MIN_FOREGROUND:
        return {"background": background, "foreground": None, "shape": None}
    foreground_rgb = rgb[:, far].median(dim=1).values
    foreground = nearest_color(foreground_rgb, exclude=background)
    # Each pixel to the nearer of the two measured colours: a soft edge splits half-way, as drawn.
    nearer = (rgb - foreground_rgb[:, None, None]).norm(dim=0) < to_background
    mask = F.avg_pool2d(nearer[None, None].float(), 3, stride=1, padding=1)[0, 0] > 0.5
    if mask.float().mean() < MIN_FOREGROUND:
        return {"background": background, "foreground": foreground, "shape": None}
    shape, _ = classify_shape(_largest_component(mask.numpy()))
    return {"background": background, "foreground": foreground, "shape": shape}


def score(readings: list[dict[str, Any]], truths: list[tuple[str, str, str]]) -> dict[str, Any]:
    """Accuracies of readings against (foreground, shape, background) truths, with chance beside each."""
    hits = {field: 0 for field in (*FIELDS, "all_three")}
    for reading, (fg, shape, bg) in zip(readings, truths, strict=True):
        right = {"background": reading["background"] == bg, "foreground": reading["foreground"] == fg,
                 "shape": reading["shape"] == shape}
        for field in FIELDS:
            hits[field] += right[field]
        hits["all_three"] += all(right.values())
    n = max(1, len(truths))
    return {"images": len(truths), **{field: hits[field] / n for field in hits},
            "chance": dict(CHANCE)}


def held_out_prompts(hold_out: float, count: int | None = None, seed: int = 0) -> list[tuple[str, str, str]]:
    """The held-out (foreground, shape, background) triples, in a seeded order (all of them by default)."""
    combos = sorted(held_out_combinations(hold_out))
    if not combos:
        raise ValueError("prompt fidelity needs held-out combinations: hold_out must be > 0 "
                         "(conf/data/synthetic.yaml data.synthesize.hold_out)")
    random.Random(stream_seed(seed, "prompt fidelity")).shuffle(combos)
    return combos[:count] if count else combos


def ground_truth_images(combos: list[tuple[str, str, str]], size: int = 128, seed: int = 0,
                        radius_range: tuple[float, float] = (0.2, 0.35), quality: int = 90) -> torch.Tensor:
    """The writer's pictures of ``combos`` (random centre and radius, JPEG round trip): ``[N, 3, size, size]``."""
    images = []
    for index, (fg, shape, bg) in enumerate(combos):
        rng = random.Random(stream_seed(seed, "prompt fidelity image", index))
        radius = rng.uniform(*radius_range) * size
        center = (rng.uniform(radius, size - radius), rng.uniform(radius, size - radius))
        buffer = io.BytesIO()
        draw_scene(fg, shape, bg, size, size, center, radius).save(buffer, format="JPEG", quality=quality)
        array = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"), dtype=np.float32) / 255
        images.append(torch.from_numpy(array).permute(2, 0, 1))
    return torch.stack(images)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean PSNR (dB) of images in [0, 1], ``[N, 3, H, W]`` each."""
    mse = (a.clamp(0, 1) - b.clamp(0, 1)).pow(2).flatten(1).mean(dim=1).clamp_min(1e-10)
    return float((10 * torch.log10(1 / mse)).mean())


def _batches(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def _synthesize_config(pipeline_dir: Path) -> dict[str, Any]:
    """The synthetic data settings the pipeline's Stage B trained on: the manifest of the shards it read
    (what was written, even when the config changed since), else its provenance's config; {} if neither."""
    provenance = pipeline_dir / "stage_b" / "export" / "provenance.json"
    try:
        data = json.loads(provenance.read_text())["config"]["data"]
    except (OSError, KeyError, ValueError, TypeError):
        return {}
    try:
        manifest = read_manifest(data["shards"])
        return {key: manifest[key] for key in ("hold_out", "radius_range") if key in manifest}
    except (OSError, KeyError, ValueError, TypeError):
        return dict(data.get("synthesize") or {})


@torch.no_grad()
def prompt_fidelity(pipeline_dir: str | Path, hold_out: float | None = None, count: int | None = 96,
                    size: int = 128, sampler: str = "tiny", seed: int = 0, batch_size: int = 16,
                    compressor_size: int = 96, radius_range: tuple[float, float] | None = None) -> dict[str, Any]:
    """Reader accuracy, Stage A PSNR, the Stage B ceiling and the cascade on held-out combinations."""
    from wurst.train.cascade_loading import load_cascade
    from wurst.train.export import load_network

    pipeline_dir = Path(pipeline_dir)
    synthesize = _synthesize_config(pipeline_dir)
    hold_out = float(synthesize.get("hold_out", 0.1) if hold_out is None else hold_out)
    radius_range = tuple(radius_range or synthesize.get("radius_range", (0.2, 0.35)))
    combos = held_out_prompts(hold_out, count, seed)
    truth = ground_truth_images(combos, size, seed, radius_range)
    result: dict[str, Any] = {"hold_out": hold_out, "held_out_combinations": len(held_out_combinations(hold_out)),
                              "sampler": sampler, "size": size}
    result["reader"] = score([read_image(x) for x in truth], combos)

    cascade = load_cascade(pipeline_dir, sampler=sampler, progress=False)
    stage_a = cascade.stage_a.eval()  # running statistics, as Stage B and the cascade use it (not the batch's)
    reconstructions = torch.cat([stage_a.decode(stage_a.encode(truth[s])).clamp(0, 1)
                                 for s in _batches(len(truth), batch_size)])
    result["stage_a"] = {"psnr_db": round(psnr(reconstructions, truth), 2),
                         **score([read_image(x) for x in reconstructions], combos)}

    compressor = load_network(pipeline_dir / "stage_b" / "export", "compressor").eval()
    captions = [caption_of(fg, shape, bg) for fg, shape, bg in combos]
    decoded = []
    for s in _batches(len(truth), batch_size):
        small = F.interpolate(truth[s], size=(compressor_size, compressor_size), mode="bilinear",
                              antialias=True, align_corners=False)
        generators = [torch.Generator().manual_seed(seed + i) for i in range(s.start, s.stop)]
        decoded.append(cascade.sample_decoder(compressor(small), captions[s], generator=generators))
    result["stage_b"] = score([read_image(x) for x in torch.cat(decoded)], combos)

    drawn = []
    for s in _batches(len(combos), batch_size):
        generators = [torch.Generator().manual_seed(seed + i) for i in range(s.start, s.stop)]
        drawn.append(cascade(captions[s], size, size, generator=generators))
    drawn_images = torch.cat(drawn)
    result["cascade"] = score([read_image(x) for x in drawn_images], combos)
    result["limit"] = limiting_stage(result)
    return result


def limiting_stage(result: dict[str, Any]) -> str:
    """Which stage loses the most of "all three right": reader → A → B (ceiling) → C (cascade)."""
    chain = [("the reader", 1.0, result["reader"]["all_three"]),
             ("Stage A (reconstruction)", result["reader"]["all_three"], result["stage_a"]["all_three"]),
             ("Stage B (decoding true compressor latents)", result["stage_a"]["all_three"],
              result["stage_b"]["all_three"]),
             ("Stage C (the prior's latents vs true ones)", result["stage_b"]["all_three"],
              result["cascade"]["all_three"])]
    name, before, after = max(chain, key=lambda item: item[1] - item[2])
    return f"{name}: all three right {before:.0%} -> {after:.0%}"


def summary_lines(result: dict[str, Any]) -> list[str]:
    """The figures as the pipeline report prints them."""
    chance = CHANCE
    lines = [(f"prompt fidelity on {result['cascade']['images']} held-out (colour, colour, shape) combinations "
              f"(chance: background {chance['background']:.0%}, foreground {chance['foreground']:.0%}, "
              f"shape {chance['shape']:.1%}, all three {chance['all_three']:.2%})")]
    for key, label in (("reader", "reader on truth"), ("stage_a", "Stage A recon"),
                       ("stage_b", "Stage B ceiling"), ("cascade", "cascade C->B->A")):
        figures = result[key]
        extra = f"  PSNR {figures['psnr_db']:.1f} dB" if "psnr_db" in figures else ""
        lines.append(f"    {label:<16} background {figures['background']:.0%}  foreground "
                     f"{figures['foreground']:.0%}  shape {figures['shape']:.0%}  all three "
                     f"{figures['all_three']:.0%}{extra}")
    lines.append(f"    limited by       {result['limit']}")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m wurst.train.prompt_fidelity",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("pipeline_dir")
    parser.add_argument("--hold-out", type=float, default=None, help="default: the pipeline's data config")
    parser.add_argument("--count", type=int, default=96)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--sampler", default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the result here")
    args = parser.parse_args(argv)
    result = prompt_fidelity(args.pipeline_dir, args.hold_out, args.count, args.size, args.sampler, args.seed)
    print("\n".join(summary_lines(result)))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
