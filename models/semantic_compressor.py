"""The semantic compressor: images → the 16-channel latent that conditions Stage B and that Stage C models.

REFERENCE.md ("The cascade"): EfficientNetV2-S features (1280 channels, stride 32) → 1×1 conv to 16
channels without bias → BatchNorm2d(16). A 1024×1024 image, fed at 768×768, becomes 16×24×24.
Inputs are images in [0, 1]; the ImageNet mean/std normalisation happens inside, so every caller
(Stage B training, Stage C training, latent caching) feeds the same thing.

The backbone comes from timm by name, so tiny configs can swap in a small timm model with the same
stride (e.g. ``test_efficientnet``: 256 channels, stride 32).
"""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from torch import nn

# REFERENCE.md "Compression": compressor inputs are ImageNet-normalised.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# File names looked for when ``pretrained`` is a directory (timm / Hugging Face layout), in order.
WEIGHT_FILE_NAMES = ("model.safetensors", "pytorch_model.bin")


class SemanticCompressor(nn.Module):
    """EfficientNet feature map → 1×1 conv (no bias) → BatchNorm2d = the semantic latent z.

    Args:
        backbone: a timm model name (``tf_efficientnetv2_s`` in the paper) whose ``forward_features``
            returns a stride-32 feature map.
        pretrained: False for random init; True for timm's ImageNet weights (downloaded by timm);
            a path to a local weights file (.safetensors / .bin / .pth) or to a directory holding
            ``model.safetensors`` or ``pytorch_model.bin``. The classifier head in such files is ignored.
        c_latent: channels of z (16).
    """

    def __init__(
        self, backbone: str = "tf_efficientnetv2_s", pretrained: bool | str = False, c_latent: int = 16
    ):
        super().__init__()
        self.backbone_name, self.c_latent = backbone, c_latent
        # num_classes=0 / global_pool="" drop the head: no unused parameters (DDP) and no wasted memory.
        head_free = {"num_classes": 0, "global_pool": ""}
        if isinstance(pretrained, bool):
            self.backbone = timm.create_model(backbone, pretrained=pretrained, **head_free)
        elif isinstance(pretrained, (str, Path)):
            weights = _weights_file(Path(pretrained))
            self.backbone = timm.create_model(
                backbone, pretrained=True, pretrained_cfg_overlay={"file": str(weights)}, **head_free
            )
        else:
            raise TypeError(
                f"SemanticCompressor: pretrained must be True, False or a local weights path, got "
                f"{pretrained!r} ({type(pretrained).__name__})"
            )
        c_features = self.backbone.num_features
        self.mapper = nn.Sequential(
            nn.Conv2d(c_features, c_latent, kernel_size=1, bias=False),
            nn.BatchNorm2d(c_latent),
        )
        # Non-persistent: normalisation constants are code, not weights.
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: ``[B, 3, H, W]`` in [0, 1] → z ``[B, c_latent, H/32, W/32]`` (ceil for odd sizes)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(
                f"SemanticCompressor: images must be [B, 3, H, W] RGB in [0, 1], got shape "
                f"{tuple(images.shape)}; add a batch axis or convert grayscale/RGBA to RGB"
            )
        x = (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)
        return self.mapper(self.backbone.forward_features(x))


def _weights_file(path: Path) -> Path:
    """Resolve ``pretrained`` given as a file or a directory to one weights file."""
    if path.is_file():
        return path
    if path.is_dir():
        for name in WEIGHT_FILE_NAMES:
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(
            f"SemanticCompressor: pretrained directory {path} holds none of {list(WEIGHT_FILE_NAMES)}; "
            f"point pretrained at the weights file itself or save the backbone as model.safetensors there"
        )
    raise FileNotFoundError(
        f"SemanticCompressor: pretrained path {path} does not exist; give a local weights file or directory, "
        f"or pretrained=true to let timm download ImageNet weights"
    )
