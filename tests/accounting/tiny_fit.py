"""A real, tiny Lightning fit with the CarbonLedger callback, run as its own process by the tests.

    python tests/accounting/tiny_fit.py --root DIR [--devices 2] [--max-steps 10] [--sleep 0.1]
        [--ckpt-every 4] [--hang-at-step 4] [--resume CKPT]

Each training step sleeps ``--sleep`` s, so the fit loop's length is known from below. Every rank
writes ``DIR/fit_rank<r>.json``: its own wall time around ``trainer.fit`` and the ledger it finalized.
``--hang-at-step K`` writes ``DIR/hanging`` once the step-K checkpoint is on disk and then blocks, so
a test can SIGKILL the process at a known point. Lightning's DDP launcher re-runs this file for rank 1.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, Dataset

from wurst.train.accounting.callback import CarbonLedger

BATCH_SIZE = 4


class Captioned(Dataset):
    """Batches shaped like the stages' data: {"images": [B, 8], "captions": list of B strings}."""

    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> dict:
        return {"images": torch.full((8,), float(i)), "captions": f"caption {i}"}


class Tiny(pl.LightningModule):
    def __init__(self, sleep: float) -> None:
        super().__init__()
        self.layer = nn.Linear(8, 1)
        self.sleep = sleep

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        time.sleep(self.sleep)
        return self.layer(batch["images"] / 64).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


class HangAfterCheckpoint(pl.Callback):
    """Blocks at the start of step ``step`` + 1, when the step-``step`` checkpoint is complete."""

    def __init__(self, root: Path, step: int) -> None:
        self.root, self.step = root, step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            (self.root / "hanging").write_text(str(self.step))
            time.sleep(600)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=10)
    parser.add_argument("--sleep", type=float, default=0.1)
    parser.add_argument("--ckpt-every", type=int, default=0)
    parser.add_argument("--hang-at-step", type=int, default=0)
    parser.add_argument("--resume", type=Path, default=None)
    args = parser.parse_args()

    ledger = CarbonLedger(carbon_intensity_kg_per_kwh=0.37, pue=1.2, fallback_watts=50.0, log_every_n_steps=2)
    callbacks: list[pl.Callback] = [ledger]
    if args.ckpt_every:
        callbacks.append(ModelCheckpoint(dirpath=args.root / "checkpoints", filename="{step}",
                                         every_n_train_steps=args.ckpt_every, save_top_k=-1))
    if args.hang_at_step:
        callbacks.append(HangAfterCheckpoint(args.root, args.hang_at_step))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto",
        max_steps=args.max_steps,
        callbacks=callbacks,
        logger=CSVLogger(args.root, name="logs", version=0),
        log_every_n_steps=2,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=bool(args.ckpt_every),
        num_sanity_val_steps=0,
    )
    loader = DataLoader(Captioned(), batch_size=BATCH_SIZE, shuffle=False)
    start = time.monotonic()
    trainer.fit(Tiny(args.sleep), loader, ckpt_path=args.resume)
    fit_wall_s = time.monotonic() - start
    out = {"fit_wall_s": fit_wall_s, "ledger": ledger.finalize().to_dict()}
    (args.root / f"fit_rank{trainer.global_rank}.json").write_text(json.dumps(out))


if __name__ == "__main__":
    main()
