"""Synthetic LAION-format shards: coloured shapes on coloured backgrounds, captioned in words.

The embedded default data for the tiny CPU pipeline and the data layer's test fixture. Shards have
img2dataset's layout (per sample ``<key>.jpg``, ``<key>.txt``, ``<key>.json`` with the LAION metadata
fields) and a ``manifest.json`` beside them saying what was designed: which samples fail which filter
rule, which members are corrupt, and therefore the exact counts a reader must report. Captions
("a red circle on a blue background") name what is drawn, so a tiny text-to-image model has
something to learn. Everything is a function of the seed: the same call writes the same bytes.
"""

from __future__ import annotations

import io
import json
import math
import os
import random
import tarfile
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageChops, ImageDraw

from wurst.data.laion_filter import LAIONFilter
from wurst.data.topology import stream_seed

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 220, 40),
    "orange": (245, 140, 30), "purple": (140, 60, 180), "pink": (240, 130, 190), "cyan": (40, 210, 220),
    "brown": (130, 80, 40), "white": (245, 245, 245), "black": (20, 20, 20), "gray": (128, 128, 128),
}
SHAPES = ("circle", "square", "triangle", "diamond", "star", "ring", "cross", "hexagon")
# Filter rules a synthetic sample can be designed to fail, and the reader's count for each.
FILTER_FAILURES = ("size", "watermark", "unsafe", "aesthetic")
# Corrupt-member kinds and the skip kind (data_stats.py) a reader must count for each.
CORRUPTIONS = {"truncated_jpg": "undecodable_image", "bad_json": "bad_json", "missing_txt": "missing_caption",
               "missing_json": "missing_json", "missing_jpg": "missing_image"}
DEFAULT_FAIL_FRACTIONS = {"size": 0.1, "watermark": 0.05, "unsafe": 0.05, "aesthetic": 0.1}
MANIFEST = "manifest.json"


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, center: tuple[float, float], radius: float,
               color: tuple[int, int, int]) -> None:
    """Draw one named shape of the given radius (half its extent) around center."""
    x, y = center
    box = (x - radius, y - radius, x + radius, y + radius)
    if shape == "circle":
        draw.ellipse(box, fill=color)
    elif shape == "square":
        draw.rectangle(box, fill=color)
    elif shape == "ring":
        draw.ellipse(box, outline=color, width=max(2, int(radius / 3)))
    elif shape == "cross":
        arm = radius / 3
        draw.rectangle((x - radius, y - arm, x + radius, y + arm), fill=color)
        draw.rectangle((x - arm, y - radius, x + arm, y + radius), fill=color)
    elif shape == "star":
        points = [(x + (radius if i % 2 == 0 else radius / 2.5) * math.sin(i * math.pi / 5),
                   y - (radius if i % 2 == 0 else radius / 2.5) * math.cos(i * math.pi / 5)) for i in range(10)]
        draw.polygon(points, fill=color)
    else:
        # PIL's rotation 0 puts a flat side at the bottom: a 4-gon needs 45° to stand on a corner.
        sides, rotation = {"triangle": (3, 0), "diamond": (4, 45), "hexagon": (6, 30)}[shape]
        draw.regular_polygon((x, y, radius), sides, rotation=rotation, fill=color)


def caption_of(foreground: str, shape: str, background: str) -> str:
    """The synthetic grammar: "a red circle on a blue background"."""
    article = "an" if foreground[0] in "aeiou" else "a"
    return f"{article} {foreground} {shape} on a {background} background"


def combinations() -> list[tuple[str, str, str]]:
    """Every (foreground, shape, background) the grammar can caption: 12 · 11 · 8 = 1,056."""
    names = sorted(COLORS)
    return [(fg, shape, bg) for fg in names for shape in SHAPES for bg in names if fg != bg]


def held_out_combinations(fraction: float) -> frozenset[tuple[str, str, str]]:
    """A fixed ``fraction`` of :func:`combinations` that training shards never show (seeded, independent of
    the shard seed), so a check can prompt for (colour, colour, shape) triples the model never saw.
    Every colour, shape and pair of them still occurs in the remaining ones (tested)."""
    if not 0 <= fraction < 1:
        raise ValueError(f"synth: hold_out={fraction} must be in [0, 1)")
    everything = combinations()
    random.Random(stream_seed(0, "held-out combinations")).shuffle(everything)
    return frozenset(everything[: round(fraction * len(everything))])


def draw_scene(foreground: str, shape: str, background: str, width: int, height: int,
               center: tuple[float, float], radius: float) -> Image.Image:
    """The picture of one (foreground, shape, background) triple, flat colours."""
    image = Image.new("RGB", (width, height), COLORS[background])
    draw_shape(ImageDraw.Draw(image), shape, center, radius, COLORS[foreground])
    return image


def synthetic_image(rng: random.Random, width: int, height: int, noise: float = 0.0,
                    held_out: frozenset[tuple[str, str, str]] = frozenset(),
                    radius_range: tuple[float, float] = (0.2, 0.35)) -> tuple[Image.Image, str]:
    """One picture and its caption; a (foreground, shape, background) in ``held_out`` is drawn again."""
    while True:
        background, foreground = rng.sample(sorted(COLORS), 2)
        shape = rng.choice(SHAPES)
        if (foreground, shape, background) not in held_out:
            break
    side = min(width, height)
    radius = rng.uniform(*radius_range) * side
    center = (rng.uniform(radius, width - radius), rng.uniform(radius, height - radius))
    image = draw_scene(foreground, shape, background, width, height, center, radius)
    if noise > 0:  # texture, so JPEG sizes and decode times look like photographs rather than flat art
        grain = Image.effect_noise((width, height), noise).convert("RGB")
        image = ImageChops.add(image, grain, scale=1.0, offset=-128)
    return image, caption_of(foreground, shape, background)


def _passing_metadata(rng: random.Random, laion_filter: LAIONFilter, aspect: float) -> dict[str, Any]:
    low = laion_filter.min_original_size or 1
    high = laion_filter.max_original_size or 8192
    long_side = rng.randint(max(low, int(low * max(aspect, 1 / aspect)) + 1), high)
    short_side = max(low, int(long_side / max(aspect, 1 / aspect)))
    width, height = (long_side, short_side) if aspect >= 1 else (short_side, long_side)
    watermark_cap = laion_filter.max_pwatermark if laion_filter.max_pwatermark is not None else 1.0
    unsafe_cap = laion_filter.max_punsafe if laion_filter.max_punsafe is not None else 1.0
    aesthetic_floor = laion_filter.min_aesthetic if laion_filter.min_aesthetic is not None else 4.0
    return {"original_width": width, "original_height": height,
            "pwatermark": round(rng.uniform(0, 0.9 * watermark_cap), 4),
            "punsafe": round(rng.uniform(0, 0.9 * unsafe_cap), 4),
            "aesthetic": round(rng.uniform(aesthetic_floor + 0.01, aesthetic_floor + 3), 4)}


def _fail(meta: dict[str, Any], rule: str, rng: random.Random, laion_filter: LAIONFilter) -> None:
    """Make ``meta`` fail exactly ``rule``: out of range, or missing (which also fails)."""
    variant = rng.randrange(3)
    if rule == "size":
        side = rng.choice(("original_width", "original_height"))
        low, high = laion_filter.min_original_size, laion_filter.max_original_size
        options = [None] + ([low // 2] if low else []) + ([high * 2] if high else [])
        meta[side] = options[variant % len(options)]
    elif rule == "watermark":
        cap = laion_filter.max_pwatermark
        meta["pwatermark"] = None if variant == 0 else round(rng.uniform(cap + 1e-3, 1.0) if cap < 1 else 2.0, 4)
    elif rule == "unsafe":
        cap = laion_filter.max_punsafe
        meta["punsafe"] = None if variant == 0 else round(cap + (1.0 - cap) * rng.uniform(0.1, 1.0), 6)
    elif rule == "aesthetic":
        if variant == 0:
            del meta["aesthetic"]
        else:
            meta["aesthetic"] = round(rng.uniform(0, laion_filter.min_aesthetic - 0.01), 4)


def _add_member(tar: tarfile.TarFile, name: str, payload: bytes) -> int:
    """Add a member with fixed metadata (byte-identical reruns); returns the offset of its header."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(payload), 0, 0o644
    offset = tar.offset
    tar.addfile(info, io.BytesIO(payload))
    return offset


def write_synthetic_shards(out_dir: str | os.PathLike, num_samples: int = 512, num_shards: int = 8,
                           resolution: int = 128, seed: int = 0,
                           fail_fractions: Mapping[str, float] | None = None,
                           corrupt: Mapping[str, int] | None = None, truncate_last_shard: bool = False,
                           laion_filter: LAIONFilter | None = None, aspect_ratios: Sequence[float] = (1.0,),
                           noise: float = 0.0, quality: int = 90, hold_out: float = 0.0,
                           radius_range: Sequence[float] = (0.2, 0.35)) -> dict[str, Any]:
    """Write ``num_shards`` tar shards of ``num_samples`` samples (in total) and their manifest.

    fail_fractions: {rule: fraction of samples failing it}, rules from FILTER_FAILURES; each such
        sample fails exactly that rule of ``laion_filter`` (default: the REFERENCE thresholds).
    corrupt: {kind: number of samples}, kinds from CORRUPTIONS; taken from samples that pass.
    truncate_last_shard: cut the last shard in the middle of its middle sample's image.
    aspect_ratios: image width/height ratios to draw from (images have about resolution**2 pixels).
    noise: Gaussian grain sigma (0 = flat colours).
    hold_out: fraction of the (foreground, shape, background) combinations no sample shows
        (:func:`held_out_combinations`); the manifest lists them.
    radius_range: shape radius (half its extent) as a fraction of the short side, drawn uniformly.
    Returns the manifest (also written to ``out_dir/manifest.json``), with ``expected`` reader counts.
    """
    laion_filter = laion_filter or LAIONFilter()
    fail_fractions = dict(DEFAULT_FAIL_FRACTIONS if fail_fractions is None else fail_fractions)
    corrupt = dict(corrupt or {})
    if num_samples < 1 or num_shards < 1 or resolution < 8:
        raise ValueError(f"synth: num_samples={num_samples}, num_shards={num_shards}, resolution={resolution}: "
                         "need at least 1 sample, 1 shard and 8 px")
    unknown = (set(fail_fractions) - set(FILTER_FAILURES)) | (set(corrupt) - set(CORRUPTIONS))
    if unknown:
        raise ValueError(f"synth: unknown failure kinds {sorted(unknown)}; filter rules are {FILTER_FAILURES}, "
                         f"corruptions are {sorted(CORRUPTIONS)}")
    for rule, fraction in fail_fractions.items():
        if fraction and rule not in laion_filter.active_rules():
            raise ValueError(f"synth: fail_fractions[{rule!r}]={fraction} but that filter rule is switched off")
    failing = {rule: round(fraction * num_samples) for rule, fraction in fail_fractions.items()}
    if sum(failing.values()) + sum(corrupt.values()) > num_samples:
        raise ValueError(f"synth: {sum(failing.values())} failing + {sum(corrupt.values())} corrupt samples "
                         f"exceed num_samples={num_samples}; lower the fractions or counts")

    # Which sample gets which fate: a seeded permutation, failures first, then corruptions.
    order = list(range(num_samples))
    random.Random(stream_seed(seed, "fates")).shuffle(order)
    fates = ["pass"] * num_samples
    cursor = 0
    for fate, count in [*failing.items(), *corrupt.items()]:
        for index in order[cursor : cursor + count]:
            fates[index] = fate
        cursor += count

    held_out = held_out_combinations(hold_out)
    low, high = (float(r) for r in radius_range)
    if not 0 < low <= high <= 0.5:
        raise ValueError(f"synth: radius_range={list(radius_range)} must satisfy 0 < low <= high <= 0.5")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    per_shard = math.ceil(num_samples / num_shards)
    shard_names: list[str] = []
    lost: list[str] = []
    designed: dict[str, str] = {}
    for shard in range(num_shards):
        indices = range(shard * per_shard, min(num_samples, (shard + 1) * per_shard))
        name = f"{shard:05d}.tar"
        tmp = out / (name + ".tmp")
        image_offsets: list[tuple[int, int, str]] = []
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for index in indices:
                key = f"{shard:05d}{index - shard * per_shard:04d}"
                fate = fates[index]
                designed[key] = fate
                rng = random.Random(stream_seed(seed, "sample", index))
                aspect = rng.choice(list(aspect_ratios))
                width = max(8, round(resolution * math.sqrt(aspect)))
                height = max(8, round(resolution / math.sqrt(aspect)))
                image, caption = synthetic_image(rng, width, height, noise, held_out, (low, high))
                buffer = io.BytesIO()
                image.save(buffer, format="JPEG", quality=quality)
                jpg = buffer.getvalue()
                meta = _passing_metadata(rng, laion_filter, aspect)
                if fate in FILTER_FAILURES:
                    _fail(meta, fate, rng, laion_filter)
                if index % 2 and "aesthetic" in meta:  # img2dataset keeps either spelling of the score
                    meta["AESTHETIC_SCORE"] = meta.pop("aesthetic")
                meta = {"url": f"https://synthetic.invalid/{key}.jpg", "key": key, "caption": caption,
                        "status": "success", "error_message": None, "width": width, "height": height,
                        "similarity": round(rng.uniform(0.28, 0.4), 4), "LICENSE": "?", "NSFW": "UNLIKELY",
                        **meta}
                if fate == "truncated_jpg":
                    jpg = jpg[: len(jpg) * 2 // 5]
                if fate != "missing_jpg":
                    image_offsets.append((_add_member(tar, f"{key}.jpg", jpg), len(jpg), key))
                if fate != "missing_txt":
                    _add_member(tar, f"{key}.txt", caption.encode())
                if fate != "missing_json":
                    payload = b'{"caption": "a red' if fate == "bad_json" else json.dumps(meta).encode()
                    _add_member(tar, f"{key}.json", payload)
        if truncate_last_shard and shard == num_shards - 1 and image_offsets:
            offset, size, cut_key = image_offsets[len(image_offsets) // 2]
            os.truncate(tmp, offset + 512 + size // 2)  # USTAR: a 512-byte header, then the data
            keys = [f"{shard:05d}{i - shard * per_shard:04d}" for i in indices]
            lost = keys[keys.index(cut_key):]
        os.replace(tmp, out / name)
        shard_names.append(name)

    readable = {key: fate for key, fate in designed.items() if key not in lost}
    fate_counts = Counter(readable.values())
    expected = {"samples_accepted": fate_counts["pass"], "truncated_tar": int(bool(lost))}
    expected.update({f"filtered_{rule}": fate_counts[rule] for rule in FILTER_FAILURES})
    expected.update({CORRUPTIONS[kind]: fate_counts[kind] for kind in CORRUPTIONS})
    # A sample missing its image is still a sample (it has txt/json); one cut by truncation is not.
    expected["samples_read"] = len(readable)
    manifest = {"num_samples": num_samples, "num_shards": num_shards, "resolution": resolution, "seed": seed,
                "shards": shard_names, "lost_to_truncation": lost, "hold_out": hold_out,
                "held_out": sorted(held_out), "radius_range": [low, high], "fates": designed, "expected": expected}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def read_manifest(out_dir: str | os.PathLike) -> dict[str, Any]:
    """The manifest a previous :func:`write_synthetic_shards` left in ``out_dir``."""
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; write synthetic shards with `wurst-data synth --out {out_dir}`")
    return json.loads(path.read_text())
