"""Every step's randomness from where the run is: (seed, step, rank, micro-batch).

Noise, timesteps, caption dropout, conditioning augmentation and network dropout then depend only on the
step being trained, so a run resumed from a checkpoint continues exactly as an uninterrupted one would,
and every stage (A, B, C) counts its steps in the same unit: optimizer steps of its main network.
"""

from __future__ import annotations

import random

import torch


def seed_step(seed: int, step: int, rank: int, micro_batch: int = 0) -> None:
    """Seeds Python's and torch's RNGs from (seed, step, rank, micro-batch) at the start of a step."""
    mixed = (int(seed) * 1_000_003 + int(step) * 7919 + int(rank) * 104_729 + int(micro_batch) * 31) % (2**63 - 1)
    random.seed(mixed)
    torch.manual_seed(mixed)
