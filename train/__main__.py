"""``wurst-train`` / ``python -m wurst.train``: one stage, one paper phase, or the whole A→B→C pipeline."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig

from wurst.train.config import CONFIG_DIR, register_resolvers

log = logging.getLogger("wurst")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def run(cfg: DictConfig) -> float | None:
    register_resolvers()
    if cfg.get("stage") is not None:
        from wurst.train.run_stage import train_stage

        metrics = train_stage(cfg)
        write_member_metrics(metrics)
        return metrics.get("train/loss")
    from wurst.train.pipeline import run_pipeline
    from wurst.train.pipeline_report import report_pipeline

    result = run_pipeline(cfg)
    report_pipeline(cfg, result)
    return None


def write_member_metrics(metrics: dict) -> None:
    """Final metrics beside Hydra's output, where the sweep summary reads them."""
    from lightning.pytorch.utilities import rank_zero_only

    if rank_zero_only.rank != 0:
        return
    try:
        from hydra.core.hydra_config import HydraConfig

        out = Path(HydraConfig.get().runtime.output_dir)
    except ValueError:
        return
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))


def main() -> None:
    run()


if __name__ == "__main__":
    main()
