"""``wurst-train`` that also writes down, on every rank, the state it ended with (the DDP tests' witness).

Usage: exactly ``wurst-train``'s command line, e.g. under torchrun or srun::

    torchrun --standalone --nproc_per_node=2 rank_state_train.py stage=b experiment=tiny trainer=ddp ...

The training is the real one (``wurst.train.__main__.main``: same config, same callbacks); the only
additions are a callback (``RankState``) appended to what ``wurst.train.callbacks.build_callbacks``
returns, and, in Stage B, a record of whether each step's compressor latents were zeroed (the
per-rank draw that once broke DDP). Nothing it does changes what the run computes. In DDP only rank 0
writes checkpoints and the export, so this is how a test sees the other ranks. Each rank writes to
``<run_dir>/rank_state/``:

- ``rank<r>.safetensors``: its LightningModule's whole state dict at the end of fit (every network,
  the EMA copy, BatchNorm statistics and other buffers);
- ``rank<r>.json``: ``{"rank", "world_size", "node", "step", "find_unused_parameters", "batchnorm_classes"}``
  (the BatchNorm classes the module held while training, e.g. ``CPUSyncBatchNorm`` under DDP);
- ``rank<r>.batches.jsonl``: ``{"step", "keys"}`` per training step (the samples it trained on);
- ``rank<r>.draws.jsonl`` (Stage B): ``{"step", "zeroed"}`` per training step.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning as L
import torch
from safetensors.torch import save_file
from torch.nn.modules.batchnorm import _BatchNorm

import wurst.train.callbacks
from wurst.train.__main__ import main
from wurst.train.stage_b_module import StageBModule


class RankState(L.Callback):
    def __init__(self, run_dir: Path) -> None:
        self.folder = Path(run_dir) / "rank_state"

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.batchnorm_classes = sorted(
            {type(m).__name__ for m in pl_module.modules() if isinstance(m, _BatchNorm)}
        )

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int
    ) -> None:
        record = {"step": trainer.global_step, "keys": list(batch.get("keys", []))}
        with open(self.folder / f"rank{trainer.global_rank}.batches.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        rank = trainer.global_rank
        state = {k: v.detach().cpu().clone().contiguous() for k, v in pl_module.state_dict().items()}
        save_file(state, str(self.folder / f"rank{rank}.safetensors"))
        record = {
            "rank": rank,
            "world_size": trainer.world_size,
            "node": os.environ.get("SLURMD_NODENAME"),  # under SLURM
            "step": trainer.global_step,
            "find_unused_parameters": getattr(trainer.strategy.model, "find_unused_parameters", None),
            "batchnorm_classes": self.batchnorm_classes,
        }
        (self.folder / f"rank{rank}.json").write_text(json.dumps(record))


def observe() -> None:
    build_real_callbacks = wurst.train.callbacks.build_callbacks

    def build_callbacks_with_state(cfg, run_dir: Path) -> list[L.Callback]:
        return [*build_real_callbacks(cfg, run_dir), RankState(run_dir)]

    # train.run_stage imports build_callbacks when a stage starts: replacing the module attribute is enough.
    wurst.train.callbacks.build_callbacks = build_callbacks_with_state

    real_condition_latents = StageBModule.condition_latents

    def condition_latents(self, z: torch.Tensor) -> torch.Tensor:
        out = real_condition_latents(self, z)
        folder = Path(self.trainer.default_root_dir) / "rank_state"
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / f"rank{self.global_rank}.draws.jsonl", "a") as handle:
            handle.write(
                json.dumps({"step": self.global_step, "zeroed": not bool(out.detach().any())}) + "\n"
            )
        return out

    StageBModule.condition_latents = condition_latents


if __name__ == "__main__":
    observe()
    main()
