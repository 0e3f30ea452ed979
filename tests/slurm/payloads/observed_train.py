"""``wurst-train`` with one more callback that writes down what each rank did (the SLURM tests' witness).

Usage: exactly ``wurst-train``'s command line, e.g.::

    python observed_train.py stage=c experiment=tiny trainer=ddp trainer.num_nodes=2 ...

The training is the real one (``wurst.train.__main__.main``, same config, same callbacks); the only change is
``RankRecorder`` appended to the callbacks ``wurst.train.callbacks.build_callbacks`` returns (``observe()``, run
only as a script: importing this module changes nothing). In DDP only
rank 0 writes checkpoints and the export, so this is how a test sees rank 1 at all. Each rank appends
JSON lines to ``<run_dir>/ranks/rank<r>.jsonl``:

    {"event": "start", "rank", "world_size", "node", "restart", "step", "job_id"}
    {"event": "batch", "rank", "step", "epoch", "keys": [...]}    before each training step
    {"event": "end", "rank", "step", "network_sha256", "export_sha256"}

Synthetic shard keys are ``<5-digit shard><4-digit index>``, so the keys also say which shards a rank read.

``WURST_TEST_FIRST_RUN_STEP_SLEEP_S=<s>`` makes every step of a job's first run (SLURM_RESTART_COUNT 0)
that much longer, so a test can have SLURM's time-limit warning arrive mid-run while the requeued run
finishes quickly.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch

import wurst.train.callbacks
from wurst.train.__main__ import main


def weights_sha256(state: Mapping[str, torch.Tensor]) -> str:
    """A digest of a state dict (names, dtypes, shapes and bytes of each tensor), e.g. a safetensors file."""
    digest = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class RankRecorder(L.Callback):
    """Appends this rank's starts, trained batches and final weight digests to ``run_dir/ranks/``."""

    def __init__(self, run_dir: Path) -> None:
        self.folder = Path(run_dir) / "ranks"
        first_run = int(os.environ.get("SLURM_RESTART_COUNT", "0")) == 0
        self.step_sleep_s = (
            float(os.environ.get("WURST_TEST_FIRST_RUN_STEP_SLEEP_S", "0")) if first_run else 0.0
        )

    def _write(self, trainer: L.Trainer, record: dict[str, Any]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        line = json.dumps({"rank": trainer.global_rank, "step": trainer.global_step, **record})
        with open(self.folder / f"rank{trainer.global_rank}.jsonl", "a") as handle:
            handle.write(line + "\n")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write(
            trainer,
            {
                "event": "start",
                "world_size": trainer.world_size,
                "node": os.environ.get("SLURMD_NODENAME"),
                "restart": int(os.environ.get("SLURM_RESTART_COUNT", "0")),
                "job_id": os.environ.get("SLURM_JOB_ID"),
            },
        )

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        keys = list(batch.get("keys", []))
        self._write(trainer, {"event": "batch", "epoch": trainer.current_epoch, "keys": keys})
        time.sleep(self.step_sleep_s)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write(
            trainer,
            {
                "event": "end",
                "network_sha256": weights_sha256(pl_module.network.state_dict()),
                "export_sha256": weights_sha256(pl_module.export_network().state_dict()),
            },
        )


def observe() -> None:
    """Adds ``RankRecorder`` to every stage run of this process."""
    build_real_callbacks = wurst.train.callbacks.build_callbacks

    def build_callbacks_with_recorder(cfg, run_dir: Path) -> list[L.Callback]:
        return [*build_real_callbacks(cfg, run_dir), RankRecorder(run_dir)]

    # train.run_stage imports build_callbacks when a stage starts: replacing the module attribute is enough.
    wurst.train.callbacks.build_callbacks = build_callbacks_with_recorder


if __name__ == "__main__":
    observe()
    main()
