"""Blocks shared by Stage B (DiffNeXt) and Stage C (the prior).

Module and parameter names follow the public v2 checkpoints (diffusers' ``WuerstchenPrior`` /
``WuerstchenDiffNeXt``), so state dicts interchange without a key mapping. Attention goes through
``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient kernels on GPU).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel axis of a ``[B, C, H, W]`` tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class GlobalResponseNorm(nn.Module):
    """ConvNeXt-V2 global response normalisation on channels-last ``[B, H, W, C]`` tensors."""

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.beta = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spatial_norm = torch.norm(x, p=2, dim=(1, 2), keepdim=True)
        relative = spatial_norm / (spatial_norm.mean(dim=-1, keepdim=True) + 1e-6)
        return self.gamma * (x * relative) + self.beta + x


class TimestepBlock(nn.Module):
    """Affine modulation of ``[B, C, H, W]`` features by a time embedding ``[B, c_timestep]``."""

    def __init__(self, c: int, c_timestep: int):
        super().__init__()
        self.mapper = nn.Linear(c_timestep, c * 2)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        scale, shift = self.mapper(t)[:, :, None, None].chunk(2, dim=1)
        return x * (1 + scale) + shift


class ResBlock(nn.Module):
    """ConvNeXt-style block: depthwise conv, LayerNorm, MLP with GRN; residual."""

    def __init__(self, c: int, c_skip: int = 0, kernel_size: int = 3, dropout: float = 0.0):
        super().__init__()
        self.depthwise = nn.Conv2d(c + c_skip, c, kernel_size=kernel_size, padding=kernel_size // 2, groups=c)
        self.norm = LayerNorm2d(c, elementwise_affine=False, eps=1e-6)
        self.channelwise = nn.Sequential(
            nn.Linear(c, c * 4), nn.GELU(), GlobalResponseNorm(c * 4), nn.Dropout(dropout), nn.Linear(c * 4, c)
        )

    def forward(self, x: torch.Tensor, x_skip: torch.Tensor | None = None) -> torch.Tensor:
        residual = x
        if x_skip is not None:
            x = torch.cat([x, x_skip], dim=1)
        x = self.norm(self.depthwise(x)).permute(0, 2, 3, 1)
        return self.channelwise(x).permute(0, 3, 1, 2) + residual


class Attention(nn.Module):
    """Multi-head attention of image tokens over a key/value sequence, via SDPA.

    Parameter names (``to_q``, ``to_k``, ``to_v``, ``to_out.0``) match diffusers' ``Attention``.
    """

    def __init__(self, c: int, nhead: int, dropout: float = 0.0):
        super().__init__()
        if c % nhead != 0:
            raise ValueError(f"attention width c={c} must be divisible by nhead={nhead}")
        self.nhead = nhead
        self.to_q = nn.Linear(c, c)
        self.to_k = nn.Linear(c, c)
        self.to_v = nn.Linear(c, c)
        self.to_out = nn.ModuleList([nn.Linear(c, c), nn.Dropout(dropout)])

    def forward(self, x: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        """x: ``[B, C, H, W]``; kv: ``[B, L, C]`` → ``[B, C, H, W]``."""
        b, c, h, w = x.shape
        q = self.to_q(x.flatten(2).transpose(1, 2))  # [B, HW, C]
        k, v = self.to_k(kv), self.to_v(kv)

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.unflatten(-1, (self.nhead, c // self.nhead)).transpose(1, 2)  # [B, nhead, L, C/nhead]

        # Dropout only after the output projection (to_out.1), as diffusers' Würstchen blocks do:
        # attention-probability dropout would also force SDPA off its fused kernels.
        out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v))
        out = out.transpose(1, 2).flatten(2)  # [B, HW, C]
        out = self.to_out[1](self.to_out[0](out))
        return out.transpose(1, 2).reshape(b, c, h, w)


class AttnBlock(nn.Module):
    """Pre-norm attention; with ``self_attn`` the image tokens join the conditioning as keys/values."""

    def __init__(self, c: int, c_cond: int, nhead: int, self_attn: bool = True, dropout: float = 0.0):
        super().__init__()
        self.self_attn = self_attn
        self.norm = LayerNorm2d(c, elementwise_affine=False, eps=1e-6)
        self.attention = Attention(c, nhead, dropout=dropout)
        self.kv_mapper = nn.Sequential(nn.SiLU(), nn.Linear(c_cond, c))

    def forward(self, x: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        """x: ``[B, c, H, W]``; kv: ``[B, L, c_cond]``."""
        kv = self.kv_mapper(kv)
        normed = self.norm(x)
        if self.self_attn:
            kv = torch.cat([normed.flatten(2).transpose(1, 2), kv], dim=1)
        return x + self.attention(normed, kv)


def timestep_embedding(r: torch.Tensor, c_r: int, max_positions: int = 10000) -> torch.Tensor:
    """Sinusoidal embedding of continuous time ``r`` in [0, 1] (scaled by ``max_positions``).

    r: ``[B]`` → ``[B, c_r]`` (sin half, then cos half; zero-padded when ``c_r`` is odd).
    """
    r = r * max_positions
    half = c_r // 2
    freq = torch.arange(half, device=r.device).float().mul(-math.log(max_positions) / (half - 1)).exp()
    angles = r[:, None].float() * freq[None, :]
    emb = torch.cat([angles.sin(), angles.cos()], dim=1)
    if c_r % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb.to(dtype=r.dtype)


# Attributes through which wrappers hold the module they wrap: FSDP (FullyShardedDataParallel), the
# activation-checkpoint wrapper, and torch.compile's OptimizedModule.
_WRAPPED_MODULE_ATTRIBUTES = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod")


def unwrapped(module: nn.Module) -> nn.Module:
    """The block inside any wrappers, so that a network dispatches on its blocks' kinds (which inputs a
    block takes) whether or not FSDP, activation checkpointing or compile wrapped them."""
    while True:
        inner = next((getattr(module, name) for name in _WRAPPED_MODULE_ATTRIBUTES if hasattr(module, name)), None)
        if inner is None:
            return module
        module = inner
