"""The pipeline ledger: a pipeline directory's stages summed, in the shape of the paper's Table 2.

Reads ``<pipeline_dir>/stage_{a,b,c}`` (each a stage run directory: ``export/provenance.json``, or
the newest checkpoint of a run still going) and prints params, GPU hours, train samples and CO2 per
stage and in total, with the paper's rows (conf/accounting/tables/paper_table2.yaml) beneath.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wurst.train.accounting.carbon import round_half_even
from wurst.train.accounting.ledger import Ledger, read_run_ledger
from wurst.train.accounting.tables import load_table

STAGES = ("a", "b", "c")


def is_pipeline_dir(path: str | Path) -> bool:
    """A pipeline directory has pipeline.json or at least one stage_<x>/ subdirectory."""
    path = Path(path)
    return (path / "pipeline.json").is_file() or any((path / f"stage_{s}").is_dir() for s in STAGES)


def count_params(weights_path: str | Path) -> int:
    """Number of parameters in a safetensors file, read from its header (no tensor is loaded)."""
    from safetensors import safe_open

    total = 0
    with safe_open(str(weights_path), framework="pt") as weights:
        names = weights.keys()
        for key in names:
            count = 1
            for size in weights.get_slice(key).get_shape():
                count *= size
            total += count
    return total


def stage_params(stage_dir: str | Path) -> int | None:
    """The stage network's parameter count: provenance "params", else counted from export/model.safetensors."""
    export = Path(stage_dir) / "export"
    provenance = export / "provenance.json"
    if provenance.is_file():
        params = json.loads(provenance.read_text()).get("params")
        if isinstance(params, int) and not isinstance(params, bool):
            return params
    weights = export / "model.safetensors"
    return count_params(weights) if weights.is_file() else None


@dataclass
class StageEntry:
    stage: str
    params: int | None
    ledger: Ledger
    source: Path


@dataclass
class PipelineLedger:
    """Each stage's ledger and their sum (``total``)."""

    stages: dict[str, StageEntry]
    total: Ledger

    def to_dict(self) -> dict[str, Any]:
        """For pipeline.json: {"stages": {"a": {"params", "accounting", "source"}, ...}, "total": {...}}."""
        return {
            "stages": {
                s: {"params": e.params, "accounting": e.ledger.to_dict(), "source": str(e.source)}
                for s, e in self.stages.items()
            },
            "total": self.total.to_dict(),
        }


def read_pipeline(pipeline_dir: str | Path) -> PipelineLedger:
    """The ledgers of ``pipeline_dir``'s stages that have run (stage_a, stage_b, stage_c) and their sum."""
    pipeline_dir = Path(pipeline_dir)
    stages: dict[str, StageEntry] = {}
    for stage in STAGES:
        stage_dir = pipeline_dir / f"stage_{stage}"
        if not stage_dir.is_dir():
            continue
        ledger, source = read_run_ledger(stage_dir)
        stages[stage] = StageEntry(stage, stage_params(stage_dir), ledger, source)
    if not stages:
        raise FileNotFoundError(
            f"{pipeline_dir} holds no stage_a/, stage_b/ or stage_c/ run directory; point at a pipeline "
            "directory made by `wurst-train` (e.g. outputs/tiny)"
        )
    total = Ledger()
    for entry in stages.values():
        total = total.add(entry.ledger)
    return PipelineLedger(stages, total)


def pipeline_table(pipeline_dir: str | Path) -> str:
    """``table2`` of ``read_pipeline(pipeline_dir)``: the markdown ledger a pipeline run writes beside itself."""
    return table2(read_pipeline(pipeline_dir))


def _count(n: float | None, approx: bool = False) -> str:
    # Units as the paper writes them: 0.99 B params, 318 M samples, 18.4 M params.
    if n is None:
        return "—"
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale / 2:
            text = f"{n / scale:.3g} {unit}"
            break
    else:
        text = f"{n:.3g}"
    return ("~" if approx else "") + text


def _hours(h: float | None, device: str | None, approx: bool = False) -> str:
    if h is None:
        return "—"
    text = f"{h:,.0f}" if h >= 100 else f"{h:.3g}"
    return ("~" if approx else "") + text + (f" {device}" if device else "")


def _co2(kg: float | None) -> str:
    if kg is None:
        return "—"
    return f"{round_half_even(kg):,.2f} kg" if kg >= 0.01 else f"{kg:.3g} kg"


def table2(pipeline: PipelineLedger) -> str:
    """Markdown table shaped like the paper's Table 2: this pipeline's stages, their sum, the paper's rows."""
    lines = [
        "| model | params | GPU hours | train samples | CO2 |",
        "|---|---|---|---|---|",
    ]
    for stage, entry in pipeline.stages.items():
        ledger = entry.ledger
        lines.append(
            f"| Stage {stage.upper()} (this pipeline) | {_count(entry.params)} | "
            f"{_hours(ledger.device_hours, ledger.device_name)} | {_count(ledger.samples)} | {_co2(ledger.co2_kg)} |"
        )
    params = [e.params for e in pipeline.stages.values()]
    total = pipeline.total
    lines.append(
        f"| total (this pipeline) | {_count(sum(params)) if None not in params else '—'} | "
        f"{_hours(total.device_hours, total.device_name)} | {_count(total.samples)} | {_co2(total.co2_kg)} |"
    )
    for row in load_table("paper_table2")["rows"]:
        approx = bool(row.get("approx"))
        lines.append(
            f"| {row['model']} | {_count(row['params'], approx)} | "
            f"{_hours(row['gpu_hours'], row.get('gpu'), approx)} | {_count(row['samples'], approx)} | "
            f"{_co2(row['co2_kg'])} |"
        )
    return "\n".join(lines)
