"""Sweep summaries: one row per ``--multirun`` member with its overrides and final metrics.

Hydra gives every sweep member its own directory under ``hydra.sweep.dir`` (``<dir>/<job num>/``,
with ``.hydra/overrides.yaml``), whatever the launcher: basic (local) or submitit's SLURM launcher
(``hydra/launcher=slurm``). A member reports its final metrics as a flat JSON object in
``<member dir>/metrics.json`` (or, failing that, the last row of a Lightning CSVLogger
``metrics.csv`` under it). ``write_sweep_summary`` gathers them into ``summary.md`` and
``summary.csv`` in the sweep directory; ``SweepSummary`` is the Hydra callback that does so when the
multirun ends::

    hydra:
      callbacks:
        sweep_summary:
          _target_: wurst.slurm.sweep.SweepSummary
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback


def _member_dirs(sweep_dir: Path) -> list[Path]:
    found = []
    for overrides in sweep_dir.rglob(".hydra/overrides.yaml"):
        member = overrides.parent.parent
        if ".submitit" in member.relative_to(sweep_dir).parts:
            continue
        found.append(member)

    def order(path: Path) -> tuple:
        rel = path.relative_to(sweep_dir)
        return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in rel.parts)

    return sorted(found, key=order)


def _csv_logger_metrics(member: Path) -> dict[str, Any]:
    """Last non-empty value of every column of the newest ``metrics.csv`` under ``member``."""
    files = sorted(member.rglob("metrics.csv"), key=lambda p: p.stat().st_mtime_ns)
    if not files:
        return {}
    last: dict[str, Any] = {}
    with open(files[-1], newline="") as handle:
        for row in csv.DictReader(handle):
            for key, value in row.items():
                if key is not None and value not in (None, ""):
                    last[key] = _number(value)
    return last


def _number(value: Any) -> Any:
    for cast in (int, float):
        try:
            return cast(value)
        except (TypeError, ValueError):
            pass
    return value


def collect_sweep(
    sweep_dir: str | os.PathLike, metrics_filename: str = "metrics.json"
) -> list[dict[str, Any]]:
    """One dict per member: ``member`` (its directory, relative), ``overrides``, ``status``, ``metrics``."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(
            f"sweep directory {sweep_dir} does not exist; pass hydra.sweep.dir of a --multirun"
        )
    rows = []
    for member in _member_dirs(sweep_dir):
        overrides = yaml.safe_load((member / ".hydra" / "overrides.yaml").read_text()) or []
        metrics_file = member / metrics_filename
        if metrics_file.is_file():
            metrics = json.loads(metrics_file.read_text())
            if not isinstance(metrics, dict):
                raise ValueError(
                    f"{metrics_file} holds {type(metrics).__name__}; a member's metrics must be a JSON "
                    "object of name -> value"
                )
            status = "ok"
        else:
            metrics = _csv_logger_metrics(member)
            status = "ok (metrics.csv)" if metrics else f"no {metrics_filename}"
        rows.append(
            {
                "member": str(member.relative_to(sweep_dir)),
                "overrides": [str(o) for o in overrides],
                "status": status,
                "metrics": metrics,
            }
        )
    return rows


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    if value is None:
        return ""
    return str(value)


def write_sweep_summary(
    sweep_dir: str | os.PathLike, metrics_filename: str = "metrics.json", stem: str = "summary"
) -> tuple[Path, Path]:
    """Writes ``<sweep_dir>/<stem>.md`` and ``<stem>.csv``: member, overrides, each metric, status.

    Returns (markdown path, csv path). Members without metrics still get a row (status says why).
    """
    sweep_dir = Path(sweep_dir)
    rows = collect_sweep(sweep_dir, metrics_filename)
    if not rows:
        raise FileNotFoundError(
            f"no sweep members under {sweep_dir} (no */.hydra/overrides.yaml); "
            "is this the hydra.sweep.dir of a --multirun?"
        )
    metric_names = sorted({name for row in rows for name in row["metrics"]})
    header = ["member", "overrides", *metric_names, "status"]
    table = [
        [
            row["member"],
            " ".join(row["overrides"]),
            *(row["metrics"].get(m) for m in metric_names),
            row["status"],
        ]
        for row in rows
    ]

    csv_path = sweep_dir / f"{stem}.csv"
    with open(csv_path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows([[("" if v is None else v) for v in row] for row in table])

    md_path = sweep_dir / f"{stem}.md"
    lines = [
        f"# Sweep summary: {sweep_dir}",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    lines += ["| " + " | ".join(_cell(v).replace("|", "\\|") for v in row) + " |" for row in table]
    md_path.write_text("\n".join(lines) + "\n")
    return md_path, csv_path


class SweepSummary(Callback):
    """Hydra callback: writes the sweep summary when a ``--multirun`` ends (any launcher)."""

    def __init__(self, metrics_filename: str = "metrics.json", stem: str = "summary") -> None:
        self.metrics_filename = metrics_filename
        self.stem = stem

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        md_path, _ = write_sweep_summary(config.hydra.sweep.dir, self.metrics_filename, self.stem)
        print(f"sweep summary: {md_path}")
