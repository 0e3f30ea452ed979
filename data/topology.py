"""Where this process sits in the job: its rank among the processes, its local rank on its node and its
DataLoader worker id. Data, training and evaluation all read them here, so every launcher (torchrun,
Lightning, srun) places a process the same way for each of them.

Every stream decision that must differ between readers (which shards a reader gets, which RNG it draws
from) is keyed on these numbers, so two ranks never read the same sample in finite mode and never
draw the same resampled stream.
"""

from __future__ import annotations

import hashlib
import os

import torch.distributed
import torch.utils.data


def rank_and_world_size() -> tuple[int, int]:
    """This process's (rank, world size).

    torch.distributed is the authority once a process group exists (Lightning's DDP has initialised
    it by the time dataloaders are iterated); before that, the launcher's environment: torchrun /
    Lightning (RANK, WORLD_SIZE), then SLURM's srun (SLURM_PROCID, SLURM_NTASKS); else a single process.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    for rank_var, world_var in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
        if rank_var in os.environ and world_var in os.environ:
            try:
                rank, world_size = int(os.environ[rank_var]), int(os.environ[world_var])
            except ValueError as error:
                raise ValueError(
                    f"environment {rank_var}={os.environ[rank_var]!r} / {world_var}={os.environ[world_var]!r} "
                    "must be integers; fix the launcher's environment"
                ) from error
            if not 0 <= rank < world_size:
                raise ValueError(
                    f"environment {rank_var}={rank} is not a valid rank for {world_var}={world_size}; "
                    "fix the launcher's environment (rank must be in [0, world size))"
                )
            return rank, world_size
    return 0, 1


def local_rank() -> int:
    """This process's rank on its node (which GPU it drives): LOCAL_RANK (torchrun, Lightning), then
    SLURM_LOCALID (srun), else 0."""
    for var in ("LOCAL_RANK", "SLURM_LOCALID"):
        if var in os.environ:
            try:
                value = int(os.environ[var])
            except ValueError as error:
                raise ValueError(f"environment {var}={os.environ[var]!r} must be an integer; "
                                 "fix the launcher's environment") from error
            if value < 0:
                raise ValueError(f"environment {var}={value} must be >= 0; fix the launcher's environment")
            return value
    return 0


def launched_by() -> str | None:
    """Which launcher's variables :func:`rank_and_world_size` read: ``"torchrun"`` (RANK/WORLD_SIZE),
    ``"slurm"`` (SLURM_PROCID/SLURM_NTASKS) or None (none set, or an initialised process group)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return None
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return "torchrun"
    if "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ:
        return "slurm"
    return None


def worker_and_num_workers() -> tuple[int, int]:
    """This DataLoader worker's (id, count); (0, 1) in the main process."""
    info = torch.utils.data.get_worker_info()
    if info is None:
        return 0, 1
    return info.id, info.num_workers


def stream_seed(*parts: object) -> int:
    """A 63-bit seed from a tuple such as (seed, epoch, rank, worker).

    A cryptographic digest rather than ``hash()``, so the seed is the same in every process, on every
    machine and under any PYTHONHASHSEED: a resumed or re-launched run draws the same stream.
    """
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1
