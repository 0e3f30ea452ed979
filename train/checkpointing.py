"""Crash-safe checkpoints: atomic writes and ``resume=auto``.

A checkpoint is written to a temporary file in the same folder, fsynced, then renamed over its final
name, so a kill during a save leaves the previous checkpoint intact. The temporary files such kills
leave behind are removed by the next save (a paper-size Stage C checkpoint is tens of GB; a few
preemptions would otherwise fill the disk). A write that fails (disk full, quota) raises an OSError
that names the errno, the free space and the intact previous checkpoint, instead of torch's opaque
zip-writer error. ``find_resume_checkpoint`` returns the newest checkpoint that opens as a complete
torch zip archive (CRC-checked), skipping and reporting truncated or corrupted ones.
"""

from __future__ import annotations

import errno
import logging
import os
import pickle
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins import TorchCheckpointIO

log = logging.getLogger(__name__)


TEMP_FILE = re.compile(r"^\..+\.ckpt\.tmp-(\d+)$")


class _WriteErrorRecorder:
    """A file for ``torch.save`` that remembers the OSError of a failed write: torch's zip writer turns
    it into ``RuntimeError: [enforce fail at inline_container.cc] unexpected pos``, losing the errno."""

    def __init__(self, f):
        self._f = f
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self._f.write(data)
        except OSError as error:
            self.error = error
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning CheckpointIO: temp file + fsync + rename; loads with ``weights_only=True``."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_files(path.parent)  # before writing: they may be what fills the disk
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                recorder = _WriteErrorRecorder(f)
                try:
                    torch.save(checkpoint, recorder)
                except RuntimeError:
                    if recorder.error is None:
                        raise
                    raise recorder.error from None
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as error:
            tmp.unlink(missing_ok=True)
            raise failed_write_error(path, error) from error
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def load_checkpoint(self, path, map_location=None, weights_only: bool | None = None) -> dict[str, Any]:
        # torch.load does not check the zip CRCs: flipped bytes inside a tensor would load silently as
        # wrong weights. resume=auto has checked them already; an explicit resume=<path> is checked here.
        intact, why = (True, "ok") if _identity(path) in _verified else is_valid_checkpoint(path)
        if not intact:
            raise ValueError(
                f"checkpoint {path} is corrupted ({why}); resume from an older checkpoint (resume=<path>), "
                "or use resume=auto, which skips corrupted checkpoints"
            )
        # Resumable checkpoints hold only tensors and plain containers: never unpickle code.
        try:
            return torch.load(path, map_location=map_location or "cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise pickle.UnpicklingError(
                f"refusing to load checkpoint {path}: it holds pickled objects other than tensors and plain "
                f"containers (torch.load with weights_only=True stopped at: {first_line}). wurst's checkpoints "
                "never do, so this file was written by other code or altered, and unpickling it could run "
                "arbitrary code. Resume from a checkpoint you made (resume=<path>) or start afresh (resume=null)."
            ) from error


def remove_stale_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Deletes ``.<name>.ckpt.tmp-<pid>`` files of writers that are gone (runs killed mid-save)."""
    removed = []
    for tmp in Path(folder).glob(".*.ckpt.tmp-*"):
        match = TEMP_FILE.match(tmp.name)
        if match is None or int(match.group(1)) == os.getpid() or _process_alive(int(match.group(1))):
            continue
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    if removed:
        log.info("removed %d temporary file(s) of interrupted checkpoint writes: %s", len(removed),
                 ", ".join(p.name for p in removed))
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def failed_write_error(path: Path, error: OSError) -> OSError:
    """The OSError of a failed checkpoint write, saying what failed, what is intact and what to do."""
    code = errno.errorcode.get(error.errno, "unknown errno") if error.errno else "no errno"
    try:
        free = f"{shutil.disk_usage(path.parent).free / 2**20:.1f} MiB free there"
    except OSError:
        free = "free space unknown"
    previous = sorted(p.name for p in path.parent.glob("*.ckpt") if p != path)
    intact = f"the previous checkpoints are intact ({', '.join(previous)})" if previous else "no earlier checkpoint exists"
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        advice = ("free space on that filesystem (or raise the quota), or point paths.output_dir at a larger disk "
                  "and copy the run directory there, then rerun the same command: resume=auto continues from "
                  "the newest checkpoint")
    else:
        advice = "fix the filesystem error, then rerun the same command: resume=auto continues from the newest checkpoint"
    return OSError(
        error.errno,
        f"could not save checkpoint {path}: {error.strerror or error} ({code}); {free}. Nothing was replaced: "
        f"{intact}. To continue: {advice}.",
    )


# Checkpoints whose CRCs passed in this process (path, inode, size, mtime, ctime): loading the one
# resume=auto chose does not read it a third time to check it again.
_verified: set[tuple[str, int, int, int, int]] = set()


def _identity(path: str | os.PathLike) -> tuple[str, int, int, int, int]:
    stat = os.stat(path)
    return str(Path(path).resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns


def is_valid_checkpoint(path: str | os.PathLike) -> tuple[bool, str]:
    """Whether ``path`` is a complete torch checkpoint (zip with intact CRCs)."""
    try:
        identity = _identity(path)
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
            if bad is not None:
                return False, f"member {bad} fails its CRC check"
            if not any(n.endswith("data.pkl") for n in zf.namelist()):
                return False, "no data.pkl inside: not a torch checkpoint"
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        return False, f"{type(err).__name__}: {err}"
    _verified.add(identity)
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
