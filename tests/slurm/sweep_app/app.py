"""A tiny Hydra app for the sweep test: "trains" for a few steps and reports final metrics.

Run as a 2-member sweep through the submitit SLURM launcher on the loopback cluster:
  python app.py --multirun hydra/launcher=slurm_loopback lr=0.1,0.2 \
      hydra.searchpath=[file://<repo>/conf] hydra.sweep.dir=<dir>
Each member writes metrics.json into its own Hydra output directory; the SweepSummary callback
(conf/sweep.yaml) writes summary.md and summary.csv into the sweep directory when all are done.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="sweep")
def main(cfg: DictConfig) -> float:
    # Gradient descent on f(w) = (w - 3)^2: the final loss depends on lr, so members differ.
    w = 0.0
    for _ in range(cfg.steps):
        w -= cfg.lr * 2 * (w - 3.0)
    metrics = {
        "loss": (w - 3.0) ** 2,
        "w": w,
        "steps": cfg.steps,
        "slurm_job_id": os.environ.get("SLURM_JOB_ID", ""),
        "host": os.environ.get("SLURMD_NODENAME", socket.gethostname()),
    }
    out = Path(HydraConfig.get().runtime.output_dir)
    (out / "metrics.json").write_text(json.dumps(metrics))
    return metrics["loss"]


if __name__ == "__main__":
    main()
