"""Run under ``torchrun --nproc_per_node=2``: a small conv net with a BatchNorm, converted for CPU DDP
(train/sync_batchnorm.py), trains 3 steps on each rank's half of a batch; rank 0 trains a plain copy on
the whole batch in the same process. Rank 0 writes, as JSON to argv[1], the largest differences
between the two (outputs, running statistics, weights) and the classes involved."""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
from torch import nn

from wurst.train.sync_batchnorm import convert_to_sync_batchnorm, revert_sync_batchnorm


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4)
    )


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    synced, whole = net(), net()
    originals = convert_to_sync_batchnorm(synced, "cpu")
    trained_as = type(synced[1]).__name__
    ddp = nn.parallel.DistributedDataParallel(synced)
    opt_ddp = torch.optim.SGD(ddp.parameters(), lr=0.1)
    opt_whole = torch.optim.SGD(whole.parameters(), lr=0.1)
    out_diff = 0.0
    for step in range(3):
        batch = torch.randn(8, 3, 7, 7, generator=torch.Generator().manual_seed(step)) * (step + 1) + step
        mine = batch.chunk(world)[rank]
        out = ddp(mine)
        out.square().mean().backward()
        opt_ddp.step()
        opt_ddp.zero_grad()
        ref = whole(batch)
        ref.square().mean().backward()
        opt_whole.step()
        opt_whole.zero_grad()
        out_diff = max(out_diff, (out - ref.chunk(world)[rank]).abs().max().item())
    revert_sync_batchnorm(synced, originals)
    state_diff = {
        k: (v.double() - whole.state_dict()[k].double()).abs().max().item()
        for k, v in synced.state_dict().items()
    }
    gathered = [None] * world
    dist.all_gather_object(gathered, {"out": out_diff, "state": state_diff})
    if rank == 0:
        result = {
            "trained_as": trained_as,
            "reverted_to": type(synced[1]).__name__,
            "output": max(g["out"] for g in gathered),
            "state": {k: max(g["state"][k] for g in gathered) for k in state_diff},
        }
        with open(sys.argv[1], "w") as handle:
            json.dump(result, handle)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
