"""The callbacks every stage run gets: progress bar, carbon ledger, preview grids, data position."""

from __future__ import annotations

from pathlib import Path

import hydra.utils
import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
from omegaconf import DictConfig, OmegaConf

from wurst.train.previews import PreviewGrid


def build_callbacks(cfg: DictConfig, run_dir: Path) -> list[L.Callback]:
    callbacks: list[L.Callback] = []
    if cfg.callbacks.get("progress_bar", True):
        callbacks.append(TQDMProgressBar(refresh_rate=max(1, int(cfg.trainer.get("log_every_n_steps", 10)) // 2)))
    accounting = cfg.get("accounting")
    if accounting is not None and accounting.get("_target_"):
        callbacks.append(hydra.utils.instantiate(OmegaConf.to_container(accounting, resolve=True)))
    callbacks.append(
        PreviewGrid(run_dir / "samples", every_n_steps=int(cfg.get("sample_every") or 0), prompts=list(cfg.samples_prompts))
    )
    return callbacks
