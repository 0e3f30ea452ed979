"""Fault points inside a training process: where a kill lands, and a disk that fills up.

Installed by the warm launcher in a forked ``wurst-train`` process before it starts, from a plain
dict (the "faults" of a launch request). Nothing here changes what the run computes; it only stops
it at a chosen place so the test can ``kill -9`` it there, or makes a file write fail.

``pause``: ``{"point": <where>, "step": s}``; when the run reaches the point, it appends one JSON line
``{"point", "step", "pid", ...}`` to ``events`` and sleeps until killed. ``step`` counts completed
optimiser steps (``global_step``). Points:

- ``prepare``: writing the synthetic shards (``data.synthesize``), when drawing the ``image``-th
  picture (past the first shard's, so complete shards are already in place);
- ``step``: inside step s + 1, after its forward and backward, before the optimiser update;
- ``data``: decoding an image, the first time once s steps are complete (the next batches' loading);
- ``save``: inside the save of ``step-<s>.ckpt``, its temporary file half written and fsynced.

``disk_full``: ``{"free_bytes": n}``; checkpoint temporary files share n free bytes; the write that
needs more fails with ``OSError(ENOSPC)``, as a full filesystem would answer.
"""

from __future__ import annotations

import errno
import io
import json
import os
import re
import time
from pathlib import Path
from typing import Any

TEMP_CHECKPOINT = re.compile(r"^\.step-(\d+)\.ckpt\.tmp-\d+$")
ORPHAN_TIMEOUT = 600


class FaultPoints:
    def __init__(self, events: str, pause: dict[str, Any] | None):
        self.events = Path(events)
        self.pause = pause or {}
        self.completed_steps: int | None = None  # optimiser steps done, once training has started

    def wanted(self, point: str, step: int | None) -> bool:
        return self.pause.get("point") == point and step is not None and step >= int(self.pause["step"])

    def stop_here(self, point: str, step: int | None, **detail: Any) -> None:
        """Record where the run is, then wait for the test's SIGKILL (at most ORPHAN_TIMEOUT seconds, so a
        run whose test died does not wait forever)."""
        line = json.dumps({"point": point, "step": step, "pid": os.getpid(), **detail})
        with open(self.events, "a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
        time.sleep(ORPHAN_TIMEOUT)
        os._exit(3)


def install(faults: dict[str, Any]) -> None:
    """Wrap the training stack's functions as ``faults`` asks (in this process only: a launched run)."""
    if faults.get("pause"):
        points = FaultPoints(faults["events"], faults["pause"])
        _hook_steps(points)
        _hook_data(points)
        _hook_saves(points)
    if faults.get("disk_full"):
        import wurst.train.checkpointing
        # train.checkpointing opens its temporary files with the builtin: give that module the full disk.
        wurst.train.checkpointing.open = full_disk_open(int(faults["disk_full"]["free_bytes"]))


def _hook_steps(points: FaultPoints) -> None:
    from wurst.train.diffusion_module import DiffusionStageModule

    original_step = DiffusionStageModule.optimizer_step
    original_start = DiffusionStageModule.on_train_start

    def on_train_start(self):
        points.completed_steps = int(self.global_step)  # restored from the checkpoint by now
        return original_start(self)

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        done = int(self.global_step)

        def closure():
            loss = optimizer_closure()
            if points.pause.get("point") == "step" and done == int(points.pause["step"]):
                points.stop_here("step", done)
            return loss

        result = original_step(self, epoch, batch_idx, optimizer, closure if optimizer_closure else None)
        points.completed_steps = done + 1
        return result

    DiffusionStageModule.on_train_start = on_train_start
    DiffusionStageModule.optimizer_step = optimizer_step


def _hook_data(points: FaultPoints) -> None:
    import wurst.data.synthetic
    from wurst.data.transforms import StageTransform

    original_call = StageTransform.__call__

    def call(self, payload, rng):
        if points.wanted("data", points.completed_steps):
            points.stop_here("data", points.completed_steps)
        return original_call(self, payload, rng)

    StageTransform.__call__ = call

    original_image = wurst.data.synthetic.synthetic_image
    drawn = [0]

    def synthetic_image(*args, **kwargs):
        drawn[0] += 1
        if points.pause.get("point") == "prepare" and drawn[0] == int(points.pause["image"]):
            points.stop_here("prepare", None, image=drawn[0])
        return original_image(*args, **kwargs)

    wurst.data.synthetic.synthetic_image = synthetic_image


def _hook_saves(points: FaultPoints) -> None:
    import torch

    original_save = torch.save

    def save(obj, f, *args, **kwargs):
        name = os.path.basename(getattr(f, "name", "") or "")
        match = TEMP_CHECKPOINT.match(name) if isinstance(name, str) else None
        if match and points.pause.get("point") == "save" and int(match.group(1)) == int(points.pause["step"]):
            buffer = io.BytesIO()
            original_save(obj, buffer, *args, **kwargs)
            data = buffer.getvalue()
            f.write(data[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
            points.stop_here("save", int(match.group(1)), temp_file=str(f.name), written=len(data) // 2,
                             size=len(data))
        return original_save(obj, f, *args, **kwargs)

    torch.save = save


class _FillingFile:
    """A checkpoint temp file on a disk with ``free["bytes"]`` left: the write that passes it stores what
    fits, then fails with ENOSPC (as ``write(2)`` on a full filesystem)."""

    def __init__(self, f, free: dict[str, int]):
        self._f, self._free = f, free
        self.name = f.name

    def write(self, b) -> int:
        view = memoryview(b).cast("B")
        if len(view) > self._free["bytes"]:
            self._f.write(view[: self._free["bytes"]])
            self._free["bytes"] = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.name)
        self._free["bytes"] -= len(view)
        return self._f.write(view)

    def __getattr__(self, name: str):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._f.close()


def full_disk_open(free_bytes: int):
    """``open`` for a disk with ``free_bytes`` left to checkpoint temp files (other files: unlimited)."""
    import builtins

    free = {"bytes": free_bytes}

    def open_on_full_disk(file, mode="r", *args, **kwargs):
        f = builtins.open(file, mode, *args, **kwargs)  # noqa: SIM115 (returned to the caller's with-block)
        if "w" in mode and TEMP_CHECKPOINT.match(os.path.basename(str(file))):
            return _FillingFile(f, free)
        return f

    return open_on_full_disk
