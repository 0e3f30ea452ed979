"""What an evaluation writes: ``metrics.json``, ``results.md`` beside the paper's rows, a sample grid.

The paper's numbers are not in code: they live once in ``conf/eval/paper_coco30k.yaml`` (REFERENCE.md
"Evaluation (COCO-30K)") and arrive here as ``paper_rows``: ``[{"model", "fid", "inception_score"}, ...]``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from wurst.eval.coco30k import COCO30K_SIZE
from wurst.eval.image_folder import load_rgb, resize_center_crop, write_png_atomic

# (metrics.json key, table header); arrows say which way is better.
COLUMNS = (
    ("fid", "FID ↓"),
    ("inception_score", "IS ↑"),
    ("clip_score", "CLIP score ↑"),
    ("pickscore", "PickScore ↑"),
)


def _finite_or_none(value: Any) -> Any:
    # JSON has no NaN (e.g. IS's std over a single split): write null instead.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: _finite_or_none(v) for k, v in value.items()}
    return value


def write_metrics_json(path: str | Path, metrics: Mapping[str, Any], settings: Mapping[str, Any]) -> Path:
    """``{"metrics": {...}, "settings": {...}}`` as indented JSON (non-finite numbers as null)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"metrics": _finite_or_none(dict(metrics)), "settings": _finite_or_none(dict(settings))}
    path.write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n")
    return path


def _cell(value: Any, std: Any = None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    text = f"{value:.2f}" if isinstance(value, float) else str(value)
    return f"{text} ± {std:.2f}" if isinstance(std, float) and not math.isnan(std) else text


def results_table(
    name: str, metrics: Mapping[str, Any], images: int, paper_rows: Sequence[Mapping[str, Any]] = (),
    sampler: str | None = None,
) -> str:
    """Markdown: our row (``metrics`` as in metrics.json) above the paper's rows, plus notes; ``sampler``
    is how the images were drawn (FID, IS and CLIP score move with steps and guidance)."""
    header = "| model | source | images | " + " | ".join(title for _, title in COLUMNS) + " |"
    lines = [header, "|" + "---|" * (3 + len(COLUMNS))]
    ours = [_cell(metrics.get(key), metrics.get(f"{key}_std")) for key, _ in COLUMNS]
    lines.append(f"| {name} | this run | {images:,} | " + " | ".join(ours) + " |")
    for row in paper_rows:
        unknown = set(row) - {"model", "source"} - {key for key, _ in COLUMNS}
        if unknown:
            raise ValueError(f"paper row {dict(row)} has unknown metric keys {sorted(unknown)}")
        cells = [_cell(row.get(key)) for key, _ in COLUMNS]
        source = row.get("source", "paper")
        lines.append(f"| {row['model']} | {source} | {COCO30K_SIZE:,} | " + " | ".join(cells) + " |")
    notes = [f"Sampler: {sampler}." if sampler else "Sampler: not recorded (the images were given, not generated here)."]
    if images != COCO30K_SIZE and metrics.get("fid") is not None:
        notes.append(
            f"FID over {images:,} images is not comparable with FID-30K "
            "(FID is biased upward for small sets)."
        )
    for other, value in sorted(metrics.get("pickscore_preference", {}).items()):
        notes.append(f"PickScore preference for our images over {other}: {value:.1%} (softmax per caption).")
    return "\n".join(lines) + "\n" + ("\n" + "\n".join(f"- {note}" for note in notes) + "\n" if notes else "")


def write_results_table(path: str | Path, *args: Any, **kwargs: Any) -> Path:
    """:func:`results_table` written to ``path``."""
    path = Path(path)
    path.write_text(results_table(*args, **kwargs))
    return path


def write_sample_grid(
    images: Sequence[str | Path], path: str | Path, columns: int = 4, tile: int = 256
) -> Path:
    """A PNG grid of the given image files (row-major, centre-cropped ``tile``² each)."""
    if not images:
        raise ValueError("sample grid: no images given")
    if columns < 1 or tile < 1:
        raise ValueError(f"sample grid: columns and tile must be positive, got {columns} and {tile}")
    rows = math.ceil(len(images) / columns)
    grid = Image.new("RGB", (min(columns, len(images)) * tile, rows * tile), "white")
    for i, image_path in enumerate(images):
        grid.paste(
            resize_center_crop(load_rgb(image_path), tile), ((i % columns) * tile, (i // columns) * tile)
        )
    return write_png_atomic(grid, Path(path))
