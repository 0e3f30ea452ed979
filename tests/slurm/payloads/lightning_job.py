"""Stand-in for wurst-train in the SLURM tests: a real Lightning Trainer on a few parameters.

It is configured the way slurm/preemption.py tells the wurst trainer to be: SLURMEnvironment with
auto-requeue on SIGUSR1, CheckpointOnTerminate, periodic checkpoints into run_dir/checkpoints, and a
resume from the newest checkpoint of run_dir (hpc_ckpt_*) or run_dir/checkpoints. A step is slow on
purpose (sleep) so a test can preempt it mid-run; ``--step-seconds-after-restart`` makes a requeued
run fast, so that "training longer than one allocation" fits the test's time budget.

It leaves evidence in run_dir: ``starts.jsonl`` (one line per start: restart count, step and ledger
it resumed with, the checkpoint it resumed from) and, at the end, ``final-rank<r>.json`` (step,
weights hash, ledger, the sample indices this rank trained on in its last run).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from slurm.preemption import CheckpointOnTerminate, slurm_plugins


class TinyRegression(pl.LightningModule):
    def __init__(self, step_seconds: float):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
        self.step_seconds = step_seconds
        self.seen: list[int] = []

    def training_step(self, batch, batch_idx):
        x, y, idx = batch
        self.seen.extend(int(i) for i in idx)
        time.sleep(self.step_seconds)
        return torch.nn.functional.mse_loss(self.layer(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


class Ledger(pl.Callback):
    """Stands in for the carbon ledger: state that must continue across requeues."""

    def __init__(self):
        self.samples_seen = 0
        self.segments = 0

    def on_train_start(self, trainer, pl_module):
        self.segments += 1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.samples_seen += len(batch[0]) * trainer.world_size

    def state_dict(self):
        return {"samples_seen": self.samples_seen, "segments": self.segments}

    def load_state_dict(self, state_dict):
        self.samples_seen = int(state_dict["samples_seen"])
        self.segments = int(state_dict["segments"])


class StartRecorder(pl.Callback):
    def __init__(self, run_dir: Path, ledger: Ledger, ckpt_path: str | None):
        self.run_dir, self.ledger, self.ckpt_path = run_dir, ledger, ckpt_path

    def on_train_start(self, trainer, pl_module):
        if trainer.is_global_zero:
            record = {
                "restart": int(os.environ.get("SLURM_RESTART_COUNT", "0")),
                "job_id": os.environ.get("SLURM_JOB_ID"),
                "start_step": trainer.global_step,
                "samples_seen": self.ledger.samples_seen,
                "segments": self.ledger.segments,
                "resumed_from": self.ckpt_path,
                "world_size": trainer.world_size,
                "time": time.time(),
            }
            with open(self.run_dir / "starts.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")


def newest_checkpoint(run_dir: Path) -> str | None:
    found = [p for folder in (run_dir, run_dir / "checkpoints") for p in folder.glob("*.ckpt")]
    return str(max(found, key=lambda p: p.stat().st_mtime_ns)) if found else None


def weights_sha256(module: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--max-steps", type=int, default=20)
    parser.add_argument("--step-seconds", type=float, default=0.0)
    parser.add_argument("--step-seconds-after-restart", type=float, default=None)
    parser.add_argument("--ckpt-every", type=int, default=5)
    parser.add_argument("--num-nodes", type=int, default=1)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()

    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    restart = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    step_s = args.step_seconds
    if restart and args.step_seconds_after_restart is not None:
        step_s = args.step_seconds_after_restart

    pl.seed_everything(0, verbose=False)
    n = 4096
    x = torch.randn(n, 4, generator=torch.Generator().manual_seed(0))
    y = x @ torch.tensor([[0.5], [-1.0], [2.0], [0.25]])
    loader = DataLoader(TensorDataset(x, y, torch.arange(n)), batch_size=args.batch_size, shuffle=False)

    ledger = Ledger()
    ckpt_path = newest_checkpoint(run_dir)
    world = args.num_nodes * args.devices
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=args.devices,
        num_nodes=args.num_nodes,
        strategy="ddp" if world > 1 else "auto",
        max_steps=args.max_steps,
        max_epochs=-1,
        default_root_dir=str(run_dir),
        plugins=slurm_plugins("USR1"),
        callbacks=[
            ModelCheckpoint(
                dirpath=run_dir / "checkpoints",
                filename="step-{step}",
                save_top_k=-1,
                every_n_train_steps=args.ckpt_every,
            ),
            CheckpointOnTerminate(),
            ledger,
            StartRecorder(run_dir, ledger, ckpt_path),
        ],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    module = TinyRegression(step_s)
    trainer.fit(module, loader, ckpt_path=ckpt_path)
    result = {
        "rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "global_step": trainer.global_step,
        "weights_sha256": weights_sha256(module),
        "samples_seen": ledger.samples_seen,
        "segments": ledger.segments,
        "seen_indices": module.seen,
        "restart": restart,
        "node": os.environ.get("SLURMD_NODENAME"),
    }
    (run_dir / f"final-rank{trainer.global_rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
