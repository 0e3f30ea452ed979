"""Small stand-ins with the contract's call signatures, for caching tests (no model weights needed).

ToyCompressor: images [B, 3, H, W] in [0, 1] -> z [B, 16, H/32, W/32], like models.SemanticCompressor.
ToyTextEncoder: list[str] -> (hidden [B, 77, D], pooled [B, D]), like models.TextEncoder.
"""

from __future__ import annotations

import torch
from torch import nn


class ToyCompressor(nn.Module):
    def __init__(self, c_latent: int = 16):
        super().__init__()
        self.patchify = nn.Conv2d(3, c_latent, kernel_size=32, stride=32)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.patchify(images)


class ToyTextEncoder(nn.Module):
    def __init__(self, width: int = 8, context_length: int = 77):
        super().__init__()
        self.width, self.context_length = width, context_length
        self.embedding = nn.Embedding(256, width)
        # fixed weights: every instantiation from the config is the same frozen encoder
        self.embedding.weight.data = torch.randn(256, width, generator=torch.Generator().manual_seed(0))

    def forward(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = torch.zeros(len(captions), self.context_length, dtype=torch.long)
        for i, caption in enumerate(captions):
            encoded = list(caption.encode()[: self.context_length])
            tokens[i, : len(encoded)] = torch.tensor(encoded, dtype=torch.long)
        hidden = self.embedding(tokens).cumsum(dim=1) / 10
        return hidden, hidden[:, -1]
