"""BatchNorm over the global batch under DDP: the networks a stage trains get SyncBatchNorm.

The official Stage B script trains the semantic compressor with SyncBatchNorm across GPUs
(REFERENCE.md, the cascade): every rank normalises with, and accumulates running statistics of,
the whole global batch, so the running statistics stay identical on every rank and a DDP run sees
what one process with the global batch would. ``stage.module.sync_batchnorm`` turns it on; the
stage module converts in ``setup`` (before Lightning wraps it in DDP) and puts the very modules it
replaced back in ``teardown``, so a checkpoint or export made at any time holds the plain keys
(BatchNorm2d and SyncBatchNorm share them) and the module after ``fit`` is plain again.

On accelerators the twin is torch's ``nn.SyncBatchNorm``. torch's class refuses CPU tensors, and DDP
refuses a CPU module holding one, so on CPU (gloo) the twin is :class:`CPUSyncBatchNorm`: the same
arithmetic through one differentiable all-reduce of per-channel sums, sums of squares and counts.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) whose backward sums the gradients over ranks as well."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def _cpu_sync_batch_norm(bn: _BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """Training-mode batch norm of ``x`` ``[B, C, ...]`` with the statistics of every rank's batch."""
    group = dist.group.WORLD
    channels = x.shape[1]
    dims = [d for d in range(x.ndim) if d != 1]
    local = x.double()  # E[x²] − E[x]² in float64: no cancellation worth the name at these sizes
    count = torch.full((1,), x.numel() // channels, dtype=torch.float64, device=x.device)
    stats = _SumOverRanks.apply(torch.cat([local.sum(dims), local.square().sum(dims), count]), group)
    total, squares, n = stats[:channels], stats[channels : 2 * channels], stats[2 * channels]
    mean = total / n
    var = (squares / n - mean.square()).clamp_min(0.0)  # biased: what the normalisation uses
    if bn.track_running_stats and bn.running_mean is not None:
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            momentum = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
            unbiased = var * n / (n - 1).clamp_min(1.0)
            bn.running_mean.lerp_(mean.to(bn.running_mean.dtype), momentum)
            bn.running_var.lerp_(unbiased.to(bn.running_var.dtype), momentum)
    shape = [1, channels] + [1] * (x.ndim - 2)
    y = (x - mean.to(x.dtype).view(shape)) * torch.rsqrt(var.to(x.dtype).view(shape) + bn.eps)
    if bn.affine:
        y = y * bn.weight.view(shape) + bn.bias.view(shape)
    return y


class CPUSyncBatchNorm(_BatchNorm):
    """BatchNorm over every rank's batch for CPU tensors; one process: plain BatchNorm."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.ndim < 2:
            raise ValueError(f"CPUSyncBatchNorm expects [B, C, ...] input, got {x.ndim}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return _cpu_sync_batch_norm(self, x)
        return super().forward(x)


def _synced_twin(bn: _BatchNorm, device_type: str) -> _BatchNorm:
    """A synchronised BatchNorm sharing ``bn``'s parameters and running-statistics tensors."""
    if len(bn._modules):  # e.g. a norm + activation layer: its forward is more than a BatchNorm's
        raise TypeError(
            f"convert_to_sync_batchnorm: {type(bn).__name__} has submodules; no synchronised twin known"
        )
    cls = CPUSyncBatchNorm if device_type == "cpu" else nn.SyncBatchNorm
    twin = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    for name, param in bn._parameters.items():
        twin._parameters[name] = param
    for name, buffer in bn._buffers.items():
        twin._buffers[name] = buffer
    twin.train(bn.training)
    return twin


SYNCED = (nn.SyncBatchNorm, CPUSyncBatchNorm)


def convert_to_sync_batchnorm(root: nn.Module, device_type: str) -> dict[str, _BatchNorm]:
    """Replaces every BatchNorm under ``root`` (in place) by a synchronised twin sharing its tensors,
    for training on ``device_type`` ("cpu", "cuda", ...).

    Returns the replaced modules by qualified name, for :func:`revert_sync_batchnorm`.
    """
    originals: dict[str, _BatchNorm] = {}
    for name, module in list(root.named_modules()):
        if isinstance(module, _BatchNorm) and not isinstance(module, SYNCED):
            if not name:
                raise ValueError(
                    "convert_to_sync_batchnorm: pass the network holding the BatchNorm, not the layer"
                )
            parent, _, leaf = name.rpartition(".")
            root.get_submodule(parent).add_module(
                leaf, _synced_twin(module, device_type)
            )  # same place, same order
            originals[name] = module
    return originals


def revert_sync_batchnorm(root: nn.Module, originals: dict[str, _BatchNorm]) -> None:
    """Puts the modules :func:`convert_to_sync_batchnorm` replaced back, holding the twins' current
    parameters and statistics (``.to(device)`` and checkpoint loading may have replaced tensors)."""
    for name, original in originals.items():
        twin = root.get_submodule(name)
        for key, param in twin._parameters.items():
            original._parameters[key] = param
        for key, buffer in twin._buffers.items():
            original._buffers[key] = buffer
        original.train(twin.training)
        parent, _, leaf = name.rpartition(".")
        root.get_submodule(parent).add_module(leaf, original)
