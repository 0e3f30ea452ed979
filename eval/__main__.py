"""``wurst-eval`` / ``python -m wurst.eval``: generate (optional), then score a prompt set (conf/eval/eval.yaml)."""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from wurst.eval.evaluate import evaluate

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf" / "eval")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="eval")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
