"""The pipeline report's figures: loss curves per stage from the CSV logs, and the sample grid with
each image labelled by its prompt, side by side in one PNG (matplotlib, no display needed)."""

from __future__ import annotations

import csv
import math
import textwrap
from collections.abc import Sequence
from pathlib import Path

import torch

STAGES = ("a", "b", "c")


def read_loss_curves(stage_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """``<stage_dir>/logs/**/metrics.csv`` → {column: [(step, value), ...]} for every ``train/*loss*`` column."""
    curves: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(Path(stage_dir, "logs").glob("**/metrics.csv")):
        with path.open(newline="") as handle:
            for row in csv.DictReader(handle):
                step = row.get("step")
                if not step:
                    continue
                for column, value in row.items():
                    if column and column.startswith("train/") and "loss" in column and value not in (None, ""):
                        curves.setdefault(column, []).append((int(float(step)), float(value)))
    return {column: sorted(points) for column, points in curves.items()}


def _smooth(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _plot_curves(axes, stage: str, curves: dict[str, list[tuple[int, float]]]) -> None:
    axes.set_title(f"Stage {stage.upper()} loss", fontsize=8)
    for column, points in curves.items():
        steps, values = zip(*points)
        window = max(1, len(values) // 20)
        axes.plot(steps, _smooth(list(values), window), label=column.removeprefix("train/"), linewidth=1)
    axes.set_yscale("log")
    from matplotlib.ticker import NullFormatter

    axes.yaxis.set_minor_formatter(NullFormatter())  # minor log ticks unlabelled: the labels overlap
    axes.set_xlabel("step", fontsize=7)
    axes.tick_params(labelsize=6)
    axes.legend(fontsize=6)


def write_report_figure(path: Path, pipeline_dir: Path, images: torch.Tensor | None, prompts: Sequence[str],
                        columns: int) -> Path | None:
    """Sample grid (``images`` ``[len(prompts)·columns, 3, H, W]`` row-major, each labelled with its prompt)
    on the left, one loss-curve panel per stage with CSV logs on the right; None (nothing written) when
    there are neither images nor logs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {s: read_loss_curves(pipeline_dir / f"stage_{s}") for s in STAGES}
    curves = {s: c for s, c in curves.items() if c}
    if images is None and not curves:
        return None
    rows = max(len(prompts), len(curves), 1) if images is not None else max(len(curves), 1)
    grid_columns = columns if images is not None else 0
    figure = plt.figure(figsize=(1.6 * grid_columns + (4.5 if curves else 0), 1.9 * rows), dpi=110)
    spec = figure.add_gridspec(rows, grid_columns + (3 if curves else 0))
    if images is not None:
        for index, image in enumerate(images):
            row, column = divmod(index, columns)
            axes = figure.add_subplot(spec[row, column])
            axes.imshow(image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy())
            axes.set_title("\n".join(textwrap.wrap(prompts[row], 22)), fontsize=5.5)
            axes.axis("off")
    if curves:
        per_panel = rows / len(curves)
        for i, (stage, stage_curves) in enumerate(curves.items()):
            top, bottom = math.floor(i * per_panel), math.floor((i + 1) * per_panel)
            _plot_curves(figure.add_subplot(spec[top:max(bottom, top + 1), grid_columns:]), stage, stage_curves)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path
