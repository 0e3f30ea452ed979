"""``pipeline.json`` for a pipeline trained as a chain of SLURM jobs.

``wurst-train pipeline=...`` trains A, B and C in one process and writes ``<pipeline_dir>/pipeline.json``
at the end. A chain (``python -m wurst.slurm chain``) trains each stage, or phase, in its own job, so nobody
is there at the end to write it: the chain specs end with a small job, ``afterok`` the last stage, that
runs ``python -m wurst.slurm manifest <pipeline_dir> --pipeline <name>``. It reads every stage run directory's
``export/provenance.json`` (no torch, no weights loaded) and refuses to call a pipeline directory complete
while a stage export is missing.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

STAGES = ("a", "b", "c")


def stage_phases(pipeline_dir: Path) -> dict[str, dict[str, Any]]:
    """Every run directory of ``pipeline_dir`` with an export: ``{dir name: provenance summary}``."""
    phases: dict[str, dict[str, Any]] = {}
    for provenance_path in sorted(pipeline_dir.glob("*/export/provenance.json")):
        provenance = json.loads(provenance_path.read_text())
        run_dir = provenance_path.parent.parent
        phases[run_dir.name] = {
            "run_dir": str(run_dir),
            "stage": provenance.get("stage"),
            "steps": provenance.get("steps"),
            "samples_seen": provenance.get("samples_seen"),
            "metrics": provenance.get("metrics", {}),
            "segments": (provenance.get("accounting") or {}).get("segments"),
        }
    return phases


def write_pipeline_manifest(pipeline_dir: str | os.PathLike, pipeline: str) -> Path:
    """Writes ``<pipeline_dir>/pipeline.json`` once ``stage_a``, ``stage_b`` and ``stage_c`` have exports.

    The manifest has the keys of the one ``wurst-train pipeline=...`` writes where they apply
    (``pipeline``, ``stages``: stage letter -> run directory, ``metrics``: phase -> final metrics) plus
    ``phases`` (every run directory with an export, e.g. the paper's Stage C phases 1-4) and ``chain``
    (the SLURM job that wrote it). Raises ``FileNotFoundError`` naming a missing stage export.
    """
    root = Path(pipeline_dir)
    missing = [
        f"stage_{s}" for s in STAGES if not (root / f"stage_{s}" / "export" / "model.safetensors").is_file()
    ]
    if missing:
        raise FileNotFoundError(
            f"pipeline directory {root} is not complete: no export in {', '.join(missing)} "
            f"(expected {root}/<stage>/export/model.safetensors); check those stages' jobs and logs "
            "(python -m wurst.slurm status <chain file>)"
        )
    phases = stage_phases(root)
    manifest = {
        "pipeline": pipeline,
        "stages": {s: str(root / f"stage_{s}") for s in STAGES},
        "metrics": {name: phase["metrics"] for name, phase in phases.items()},
        "phases": phases,
        "chain": {
            "written_by": "python -m wurst.slurm manifest",
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "chain_file": os.environ.get("WURST_CHAIN_FILE"),
            "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
    }
    path = root / "pipeline.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.replace(path)
    return path
