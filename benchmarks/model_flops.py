"""Model FLOPs of a training step, counted, and model FLOPs utilisation (MFU).

The count is ``torch.utils.flop_counter.FlopCounterMode`` over one forward + backward of the trained
network alone (the frozen encoders are not model FLOPs; recomputation under gradient checkpointing
is not either). It runs on the meta device: shapes only, so a 1 B-parameter network costs no memory
and a few seconds on any machine. On meta, attention takes the math path (two matmuls forward, four
backward), i.e. model FLOPs; a flash kernel's backward also recomputes QKᵀ, which is hardware work
that MFU (PaLM's definition) leaves out. MFU = counted FLOPs per step / median step time / the device's
peak dense bf16 FLOP/s from the table below.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

# Peak dense (no sparsity) bf16 tensor-core TFLOP/s from the vendors' datasheets. Keys are matched as
# substrings of the normalised torch.cuda.get_device_name(), most specific first.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100 PCIE", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM5 ("NVIDIA H100 80GB HBM3")
    ("A100", 312.0),  # SXM4 and PCIe alike
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A40", 150.0),
    ("A10", 125.0),
    ("RTX 4090", 165.0),
)


def _normalise(name: str) -> str:
    return re.sub(r"[^0-9A-Z]+", " ", name.upper()).strip()


def peak_flops_per_s(device_name: str) -> float | None:
    """Peak dense bf16 FLOP/s of a GPU from its name (``torch.cuda.get_device_name()``); None if unlisted."""
    name = _normalise(device_name)
    for key, tflops in PEAK_BF16_TFLOPS:
        if re.search(rf"(^| ){re.escape(_normalise(key))}( |$)", name):
            return tflops * 1e12
    return None


def model_flops_utilisation(flops_per_step: float, step_seconds: float, peak_flops: float | None) -> float | None:
    """Achieved model FLOP/s over the peak (0..1); None where the peak is unknown (CPU, unlisted GPU)."""
    if peak_flops is None or step_seconds <= 0:
        return None
    return flops_per_step / step_seconds / peak_flops


def count_training_flops(
    network: nn.Module,
    args: Sequence[torch.Tensor],
    kwargs: Mapping[str, Any] | None = None,
) -> int:
    """FLOPs of one forward + backward of ``network`` on ``args`` / ``kwargs`` (any device, meta too).

    The backward starts from the mean of the output, as a loss would; the network is put in train
    mode (dropout counts as it runs in training). Returns the total count (an int > 0 for any network
    with a matmul or a convolution).
    """
    network.train()
    with FlopCounterMode(display=False) as counter:
        out = network(*args, **dict(kwargs or {}))
        out.float().mean().backward()
    return int(counter.get_total_flops())


def count_on_meta(
    build: Callable[[], nn.Module],
    shapes: Sequence[Sequence[int] | None],
    kw_shapes: Mapping[str, Sequence[int] | None] | None = None,
) -> int:
    """:func:`count_training_flops` of ``build()`` on the meta device, on inputs of the given shapes.

    ``shapes`` / ``kw_shapes``: shapes of the positional / keyword tensor inputs (None passes None),
    e.g. ``[]`` and ``{"x": [B, 16, 24, 24], "r": [B], "c": [B, 77, 1280]}`` for Stage C. Meta tensors
    carry shapes only, which is all a FLOP count needs.
    """
    with torch.device("meta"):
        network = build()
        args = [None if s is None else torch.empty(*s) for s in shapes]
        kwargs = {k: None if s is None else torch.empty(*s) for k, s in (kw_shapes or {}).items()}
        return count_training_flops(network, args, kwargs)
