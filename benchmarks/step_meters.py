"""Meters for a training step: a step clock, peak memory and a host-sync counter.

The clock marks the end of every step. On CUDA a mark is a recorded event (no host sync), so the
step it times is the GPU's view: the time between two step ends, the data hand-off and any time the
GPU waits for the host included. On CPU a mark is ``time.perf_counter``.

Peak memory is ``torch.cuda.max_memory_allocated`` on CUDA; on CPU it is the process's peak resident
set size (``VmHWM``), reset per run through ``/proc/self/clear_refs`` where Linux allows it.

The host-sync counter is a dispatch mode that counts the operators which make the host wait for the
device (reading a scalar with ``.item()`` / ``bool()``, ``nonzero``, copies to the CPU) and where in
Python they were called from. On CUDA it counts only reads of CUDA tensors, i.e. real syncs; on CPU it
counts every scalar read, an upper bound of what would sync on a GPU (a read of a tensor made on the
CPU, e.g. ``torch.rand(()).item()``, never does).
"""

from __future__ import annotations

import ctypes
import gc
import os
import resource
import statistics
import time
import traceback
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parents[1]
_aten = torch.ops.aten
# Operators whose result the host must wait for: a scalar read, data-dependent output sizes.
_SCALAR_READS = {_aten._local_scalar_dense.default, _aten.equal.default}
_DATA_DEPENDENT = {_aten.nonzero.default, _aten.masked_select.default, _aten.unique_consecutive.default}


class StepClock:
    """Marks the end of each step; :meth:`step_seconds` gives the time between consecutive marks.

    On CPU it also keeps the process's CPU time (:meth:`cpu_seconds`): on a shared machine, with one
    torch thread, the steadier figure of the work a step does.
    """

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self._marks: list = []
        self._cpu_marks: list[float] = []

    def mark(self) -> None:
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self._marks.append(event)
        else:
            self._marks.append(time.perf_counter())
            self._cpu_marks.append(time.process_time())

    def __len__(self) -> int:
        return len(self._marks)

    def _first(self, skip: int) -> int:
        first = max(int(skip), 1)
        if len(self._marks) <= first:
            raise ValueError(
                f"StepClock has {len(self._marks)} marks; timing steps after {first} warm-up step(s) needs "
                f"more: raise --steps or lower --warmup"
            )
        return first

    def step_seconds(self, skip: int = 0) -> list[float]:
        """Durations of the steps after the first ``skip`` (warm-up) steps, in seconds.

        Step ``i`` lasts from mark ``i - 1`` to mark ``i``, so the first step (no earlier mark) is never
        timed: ``skip`` < 1 counts as 1.
        """
        first = self._first(skip)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return [self._marks[i - 1].elapsed_time(self._marks[i]) / 1e3 for i in range(first, len(self._marks))]
        return [self._marks[i] - self._marks[i - 1] for i in range(first, len(self._marks))]

    def cpu_seconds(self, skip: int = 0) -> list[float] | None:
        """Process CPU time of the same steps (CPU runs only; None on CUDA)."""
        if self.device.type == "cuda":
            return None
        first = self._first(skip)
        return [self._cpu_marks[i] - self._cpu_marks[i - 1] for i in range(first, len(self._cpu_marks))]


def summarise_steps(seconds: list[float], samples_per_step: int) -> dict[str, float]:
    """Median step time, samples/s at that median, and samples/s over the whole timed span."""
    if not seconds:
        raise ValueError("no timed steps to summarise; raise --steps")
    median = statistics.median(seconds)
    return {
        "step_s_median": median,
        "step_s_min": min(seconds),
        "step_s_max": max(seconds),
        "samples_per_s": samples_per_step / median,
        "samples_per_s_mean": samples_per_step * len(seconds) / sum(seconds),
        "timed_steps": len(seconds),
    }


# ---------------------------------------------------------------------------------------------- memory
def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def release_memory(device: torch.device) -> None:
    """Frees what a finished run left: Python garbage, the CUDA cache, glibc's free lists (CPU RSS)."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
    try:  # hand freed heap pages back to the OS, so the next run's RSS peak starts low
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory of one run: call :meth:`reset` before it and :meth:`read` after it (bytes)."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.kind = "cuda max_memory_allocated" if self.device.type == "cuda" else "process peak RSS"
        self.baseline = 0

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline = torch.cuda.memory_allocated(self.device)
            return
        try:  # Linux ≥ 4.0: "5" resets the peak RSS (VmHWM) to the current RSS
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            self.kind = "process peak RSS since start (could not reset /proc/self/clear_refs)"
        self.baseline = (_status_kib("VmRSS") or 0) * 1024

    def read(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return int(torch.cuda.max_memory_allocated(self.device))
        peak = _status_kib("VmHWM")
        if peak is not None:
            return peak * 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


# ---------------------------------------------------------------------------------------------- host syncs
def _call_site() -> str:
    """``path:line`` of the innermost Python caller outside torch that caused the op; when that is a
    library (Lightning, diffusers), ``… (via <innermost caller in this repository>)``."""
    here = os.path.abspath(__file__)
    torch_dir = os.path.dirname(torch.__file__)
    site = None
    for frame in reversed(traceback.extract_stack()):
        path = os.path.abspath(frame.filename)
        if path == here or path.startswith(torch_dir):
            continue
        in_repo = path.startswith(str(REPO) + os.sep) and "site-packages" not in path
        where = f"{os.path.relpath(path, REPO) if in_repo else path.split('site-packages/')[-1]}:{frame.lineno}"
        if in_repo:
            return where if site is None else f"{site} (via {where})"
        site = site or where
    return site or "<torch>"


class HostSyncCounter(TorchDispatchMode):
    """Counts operators that make the host wait for the device, and their Python call sites.

    ``device_type``: count only those whose input lives on this device type (``"cuda"``: real
    syncs); None counts every one (on CPU: the scalar reads that would sync had the tensor been on a
    GPU). Use as a context manager around one step; ``count`` and ``sites`` hold the result.
    """

    def __init__(self, device_type: str | None = None):
        super().__init__()
        self.device_type = device_type
        self.count = 0
        self.sites: Counter[str] = Counter()

    def _on_device(self, tensor: object) -> bool:
        return isinstance(tensor, torch.Tensor) and (
            self.device_type is None or tensor.device.type == self.device_type
        )

    def _syncs(self, func, args, kwargs) -> bool:
        if func in _SCALAR_READS or func in _DATA_DEPENDENT:
            return self._on_device(args[0])
        if func is _aten._to_copy.default:  # device → host copy
            target = kwargs.get("device")
            return target is not None and torch.device(target).type == "cpu" and self._on_device(args[0]) \
                and args[0].device.type != "cpu"
        if func is _aten.copy_.default:  # host tensor ← device tensor
            return args[0].device.type == "cpu" and self._on_device(args[1]) and args[1].device.type != "cpu"
        return False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self._syncs(func, args, kwargs):
            self.count += 1
            self.sites[_call_site()] += 1
        return func(*args, **kwargs)
