"""Crash-safe checkpoints: atomic writes and ``resume=auto``.

A checkpoint is written to a temporary file in the same folder, fsynced, then renamed over its final
name, so a kill during a save leaves the previous checkpoint intact. ``find_resume_checkpoint``
returns the newest checkpoint that opens as a complete torch zip archive (CRC-checked), skipping
and reporting truncated or corrupted ones.
"""

from __future__ import annotations

import logging
import os
import zipfile
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins import TorchCheckpointIO

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning CheckpointIO: temp file + fsync + rename; loads with ``weights_only=True``."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def load_checkpoint(self, path, map_location=None, weights_only: bool | None = None) -> dict[str, Any]:
        # Resumable checkpoints hold only tensors and plain containers: never unpickle code.
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)


def is_valid_checkpoint(path: str | os.PathLike) -> tuple[bool, str]:
    """Whether ``path`` is a complete torch checkpoint (zip with intact CRCs)."""
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
            if bad is not None:
                return False, f"member {bad} fails its CRC check"
            if not any(n.endswith("data.pkl") for n in zf.namelist()):
                return False, "no data.pkl inside: not a torch checkpoint"
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        return False, f"{type(err).__name__}: {err}"
    return True, "ok"


def find_resume_checkpoint(checkpoint_dir: str | os.PathLike) -> Path | None:
    """Newest valid ``*.ckpt`` in ``checkpoint_dir`` (by step recorded in name, then mtime)."""
    folder = Path(checkpoint_dir)
    if not folder.is_dir():
        return None
    candidates = sorted(
        (p for p in folder.glob("*.ckpt") if not p.name.startswith(".")),
        key=lambda p: (p.stat().st_mtime_ns, p.name),
        reverse=True,
    )
    for path in candidates:
        ok, why = is_valid_checkpoint(path)
        if ok:
            return path
        log.warning("skipping checkpoint %s: %s; falling back to an older one", path, why)
    return None



class PeriodicCheckpoint(L.Callback):
    """Saves ``step-<N>.ckpt`` every ``every_n_steps`` optimizer steps and at the end of fit,
    keeping the newest ``keep`` (at least two, so a corrupted newest still has a fallback)."""

    def __init__(self, dirpath: str | os.PathLike, every_n_steps: int, keep: int = 3):
        if every_n_steps < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {every_n_steps}")
        self.dirpath = Path(dirpath)
        self.every_n_steps = int(every_n_steps)
        self.keep = max(2, int(keep))
        self._last_saved_step = -1

    def _save(self, trainer: L.Trainer) -> None:
        step = trainer.global_step
        if step == self._last_saved_step:
            return
        trainer.save_checkpoint(self.dirpath / f"step-{step:09d}.ckpt")
        self._last_saved_step = step
        if trainer.is_global_zero:
            ckpts = sorted(self.dirpath.glob("step-*.ckpt"))
            for old in ckpts[: -self.keep]:
                old.unlink(missing_ok=True)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step > 0 and trainer.global_step % self.every_n_steps == 0:
            self._save(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self._save(trainer)
