"""PatchGAN discriminator for Stage A's adversarial loss (the standard VQGAN recipe; the paper's
Stage A is "a standard VQGAN", REFERENCE.md training recipe).

images ``[B, 3, H, W]`` in [0, 1] → patch logits ``[B, 1, H/2^n, W/2^n]``.
"""

from __future__ import annotations

import torch
from torch import nn


class PatchDiscriminator(nn.Module):
    def __init__(self, in_channels: int = 3, width: int = 64, layers: int = 3):
        super().__init__()
        blocks: list[nn.Module] = [nn.Conv2d(in_channels, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        c = width
        for i in range(1, layers):
            c_next = width * min(2**i, 8)
            blocks += [
                nn.Conv2d(c, c_next, 4, stride=2, padding=1, bias=False),
                nn.GroupNorm(min(32, c_next // 4) or 1, c_next),
                nn.LeakyReLU(0.2),
            ]
            c = c_next
        blocks += [nn.Conv2d(c, 1, 3, padding=1)]
        self.net = nn.Sequential(*blocks)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != self.net[0].in_channels:
            raise ValueError(
                f"PatchDiscriminator expects images [B, {self.net[0].in_channels}, H, W], got {tuple(images.shape)}"
            )
        return self.net(images * 2 - 1)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (torch.relu(1.0 - logits_real).mean() + torch.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    return -logits_fake.mean()
