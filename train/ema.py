"""Exponential moving average of a network's weights, as the official Würstchen scripts keep it.

The official loop updates the EMA copy every ``every`` steps; before ``start`` it copies the weights
outright (β = 0), afterwards it blends with β (REFERENCE.md, training recipe: start 5,000, every 100,
β = 0.9).
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA(nn.Module):
    """Holds ``shadow``, a frozen copy of ``model`` updated by :meth:`update`."""

    def __init__(self, model: nn.Module, start: int = 5000, every: int = 100, beta: float = 0.9):
        super().__init__()
        if every < 1:
            raise ValueError(f"ema.every must be >= 1, got {every}")
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"ema.beta must be in [0, 1), got {beta}")
        self.start, self.every, self.beta = start, every, beta
        self.shadow = copy.deepcopy(model).eval().requires_grad_(False)

    def beta_at(self, step: int) -> float:
        return self.beta if step > self.start else 0.0

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> bool:
        """Blend ``model`` into the shadow when ``step`` is an update step; returns whether it did."""
        if step % self.every != 0:
            return False
        beta = self.beta_at(step)
        for ema_p, p in zip(self.shadow.parameters(), model.parameters(), strict=True):
            ema_p.lerp_(p.detach().to(ema_p.dtype), 1.0 - beta)
        for ema_b, b in zip(self.shadow.buffers(), model.buffers(), strict=True):
            ema_b.copy_(b)
        return True
