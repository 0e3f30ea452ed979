"""Preview grids while training: what a person would rather look at than a loss curve.

Every ``every_n_steps`` the module's ``preview(batch, prompts)`` makes a ``[N, 3, H, W]`` image tensor
in [0, 1] from the first batch it saw; the grid is written as PNG under ``run_dir/samples/`` and sent
to wandb when a wandb logger is attached. The end-of-run grid is drawn by ``train/run_stage.py`` after
the final checkpoint and the export are written (:meth:`PreviewGrid.final`).

A preview is a picture, not the run: one that fails is logged with its traceback and recorded in
``failures``, training goes on, and the run reports every failure when it ends (after its export).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torchvision.utils import make_grid, save_image

log = logging.getLogger(__name__)


def _detach_batch(batch: Any, limit: int) -> Any:
    if torch.is_tensor(batch):
        return batch[:limit].detach().clone()
    if isinstance(batch, Mapping):
        return {k: _detach_batch(v, limit) for k, v in batch.items() if k != "data_stats"}
    if isinstance(batch, (list, tuple)):
        return type(batch)(batch[:limit])
    return batch


class PreviewError(RuntimeError):
    """A run whose training, final checkpoint and export completed, but whose preview failed."""


class PreviewGrid(L.Callback):
    def __init__(self, out_dir: str | Path, every_n_steps: int = 0, prompts: list[str] | None = None, count: int = 8):
        self.out_dir = Path(out_dir)
        self.every_n_steps = int(every_n_steps)
        self.prompts = list(prompts or [])
        self.count = count
        self.batch: Any = None
        self.last_path: Path | None = None
        self.failures: list[str] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.batch is None:
            self.batch = _detach_batch(batch, self.count)
        step = trainer.global_step
        if self.every_n_steps > 0 and step > 0 and step % self.every_n_steps == 0:
            self.write_or_record(trainer, pl_module, step)

    def final(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Path | None:
        """The end-of-run grid (called once the final checkpoint and the export are on disk)."""
        if self.batch is None:
            return None
        return self.write_or_record(trainer, pl_module, trainer.global_step)

    def write_or_record(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> Path | None:
        """:meth:`write`, but a failure is logged and kept in ``failures`` instead of ending the run."""
        try:
            return self.write(trainer, pl_module, step)
        except Exception as error:
            log.exception("the preview at step %d failed; training and the export are not affected", step)
            self.failures.append(f"step {step}: {type(error).__name__}: {error}")
            return None

    @torch.no_grad()
    def write(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> Path | None:
        if not trainer.is_global_zero or not hasattr(pl_module, "preview"):
            return None
        was_training = pl_module.training
        pl_module.eval()
        try:
            batch = {k: v.to(pl_module.device) if torch.is_tensor(v) else v for k, v in self.batch.items()}
            images = pl_module.preview(batch, self.prompts)
        finally:
            pl_module.train(was_training)
        if images is None:
            return None
        images = images.detach().float().clamp(0, 1).cpu()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"step-{step:09d}.png"
        grid = make_grid(images, nrow=min(len(images), self.count), padding=2)
        save_image(grid, path)
        self.last_path = path
        for logger in trainer.loggers:
            if logger.__class__.__name__ == "WandbLogger":
                logger.log_image(key="samples", images=[grid], step=step)
        return path
