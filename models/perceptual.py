"""An LPIPS-style perceptual distance for Stage A: unit-normalised VGG16 feature differences, averaged
over five layers (Zhang et al. 2018, without the learned per-channel weights unless given).

``weights``: None for random init (tests), ``"imagenet"`` for torchvision's download, or a local
``.pth`` / ``.safetensors`` file of a torchvision VGG16 ``features`` state dict (offline clusters).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

# The ReLU outputs LPIPS reads: relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 of torchvision's vgg16.features.
_TAPS = (3, 8, 15, 22, 29)
_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)


class PerceptualLoss(nn.Module):
    def __init__(self, weights: str | None = None):
        super().__init__()
        from torchvision.models import VGG16_Weights, vgg16

        if weights == "imagenet":
            features = vgg16(weights=VGG16_Weights.IMAGENET1K_V1).features
        else:
            features = vgg16(weights=None).features
            if weights is not None:
                path = Path(weights)
                if not path.is_file():
                    raise FileNotFoundError(
                        f"perceptual weights={path} not found; give a VGG16 features state dict"
                    )
                if path.suffix == ".safetensors":
                    from safetensors.torch import load_file

                    state = load_file(str(path))
                else:
                    state = torch.load(path, map_location="cpu", weights_only=True)
                features.load_state_dict(state)
        self.features = features[: _TAPS[-1] + 1].eval().requires_grad_(False)
        self.register_buffer("mean", torch.tensor(_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True):
        super().train(mode)
        self.features.eval()
        return self

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        out, x = [], (x - self.mean) / self.std
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in _TAPS:
                out.append(x / (x.norm(dim=1, keepdim=True) + 1e-10))
        return out

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """a, b: images ``[B, 3, H, W]`` in [0, 1] → mean perceptual distance (scalar)."""
        return sum((fa - fb).pow(2).sum(dim=1).mean() for fa, fb in zip(self._taps(a), self._taps(b))) / len(
            _TAPS
        )
