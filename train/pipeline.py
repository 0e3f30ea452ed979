"""The A→B→C pipeline: each stage composed from the pipeline's override list, run in order into one
pipeline directory (outputs/<group>/stage_a, stage_b, stage_c), each starting from the previous export.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from hydra import compose
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from wurst.train.previews import PreviewError
from wurst.train.run_stage import STAGES, train_stage

log = logging.getLogger(__name__)


def stage_of(overrides: list[str]) -> str | None:
    for item in overrides:
        if item.startswith("stage="):
            return item.split("=", 1)[1]
    return None


def check_stage_order(steps: list[list[str]]) -> None:
    """A pipeline trains A, then B, then C; a later stage listed first is an error."""
    seen: list[str] = []
    for overrides in steps:
        stage = stage_of(overrides)
        if stage not in STAGES:
            raise ValueError(f"pipeline step {overrides} names no stage=a|b|c")
        if seen and STAGES.index(stage) < STAGES.index(seen[-1]):
            raise ValueError(
                f"pipeline stage order violation: stage {stage.upper()} comes after stage {seen[-1].upper()}; "
                "train A, then B, then C (each consumes the previous stage's export)"
            )
        seen.append(stage)


def user_overrides() -> list[str]:
    """The command line's overrides, minus the pipeline choice itself."""
    try:
        task = list(HydraConfig.get().overrides.task)
    except ValueError:  # not inside a Hydra app
        return []
    return [o for o in task if not o.startswith(("pipeline=", "stage=", "experiment="))]


def run_pipeline(cfg: DictConfig, extra_overrides: list[str] | None = None) -> dict[str, Any]:
    steps = [list(step) for step in cfg.pipeline.steps]
    check_stage_order(steps)
    extra = list(extra_overrides if extra_overrides is not None else user_overrides())
    results: dict[str, Any] = {}
    preview_errors: dict[str, str] = {}
    pipeline_dir: Path | None = None
    started = time.time()
    for overrides in steps:
        stage_cfg = compose(config_name="train", overrides=overrides + extra)
        pipeline_dir = Path(stage_cfg.pipeline_dir)
        log.info("pipeline %s: %s", cfg.pipeline.name, " ".join(overrides))
        try:
            results[str(stage_cfg.phase)] = train_stage(stage_cfg)
        except PreviewError as error:  # the stage's export is complete: the next stage can use it
            results[str(stage_cfg.phase)] = getattr(error, "metrics", {})
            preview_errors[str(stage_cfg.phase)] = str(error)
    assert pipeline_dir is not None
    manifest = {
        "pipeline": cfg.pipeline.name,
        "steps": steps,
        "stages": {s: str(pipeline_dir / f"stage_{s}") for s in STAGES if (pipeline_dir / f"stage_{s}").is_dir()},
        "metrics": results,
        "wall_seconds": round(time.time() - started, 1),
    }
    if preview_errors:  # reported (and the exit status set) by the pipeline report, after its own work
        manifest["preview_errors"] = preview_errors
    (pipeline_dir / "pipeline.json").write_text(json.dumps(manifest, indent=2))
    return {"pipeline_dir": str(pipeline_dir), **manifest}
