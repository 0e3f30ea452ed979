"""Statistics of the global batch, identical on every DDP rank."""

from __future__ import annotations

import torch


def global_mean_std(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (unbiased) std of ``x`` over every rank's tensor, identical on every rank.

    One process: ``x.mean(), x.std()``. Under DDP one all-reduce of (sum, sum of squares, count), so a
    statistic a stage keeps in a buffer (Stage A's latent std, Stage C's measured hand-off) is that of
    the global batch and the same on every rank, not each rank's own.
    """
    x = x.detach().float()
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()) or (
        torch.distributed.get_world_size() == 1
    ):
        return x.mean(), x.std()
    local = x.double()
    count = torch.tensor(float(x.numel()), dtype=torch.float64, device=x.device)
    stats = torch.stack([local.sum(), local.square().sum(), count])
    torch.distributed.all_reduce(stats)
    total, squares, n = stats
    mean = total / n
    var = ((squares - n * mean.square()) / (n - 1)).clamp_min(0.0)
    return mean.float(), var.sqrt().float()
