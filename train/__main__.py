"""``wurst-train`` / ``python -m train``: one stage, one paper phase, or the whole A→B→C pipeline."""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig

from train.config import CONFIG_DIR, register_resolvers

log = logging.getLogger("wurst")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def run(cfg: DictConfig) -> float | None:
    register_resolvers()
    if cfg.get("stage") is not None:
        from train.run_stage import train_stage

        metrics = train_stage(cfg)
        return metrics.get("train/loss")
    from train.pipeline import run_pipeline
    from train.pipeline_report import report_pipeline

    result = run_pipeline(cfg)
    report_pipeline(cfg, result)
    return None


def main() -> None:
    run()


if __name__ == "__main__":
    main()
