"""The semantic compressor: images → the 16-channel latent that conditions Stage B and that Stage C models.

REFERENCE.md ("The cascade"): EfficientNetV2-S features (1280 channels, stride 32) → 1×1 conv to 16
channels without bias → BatchNorm2d(16). A 1024×1024 image, fed at 768×768, becomes 16×24×24.

The module has the official layout and arithmetic (dome272's ``EfficientNetEncoder``, copied in diffusers'
``examples/wuerstchen``): ``backbone`` is torchvision's ``EfficientNet(...).features`` and ``mapper`` is
``Sequential(Conv2d(1280, 16, 1, bias=False), BatchNorm2d(16))``, so the released
``model_v2_stage_b.pt["effnet_state_dict"]`` loads strictly (:meth:`SemanticCompressor.load_official_state_dict`).
The backbone is built from torchvision's own classes and a stage table given in the config
(conf/model/compressor/paper.yaml is ``efficientnet_v2_s``; tiny.yaml a small net of the same kind).

Inputs are images in [0, 1]; the ImageNet mean/std normalisation the official scripts apply before the
compressor happens inside, so every caller (Stage B training, Stage C training, latent caching) feeds the
same thing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.models.efficientnet import (
    EfficientNet,
    EfficientNet_V2_S_Weights,
    FusedMBConvConfig,
    MBConvConfig,
)

# REFERENCE.md "Compression": compressor inputs are ImageNet-normalised (the torchvision weights' transform).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The stride every consumer assumes (Stage B's injection, the cascade's latent sizes): z is [B, 16, H/32, W/32].
COMPRESSOR_STRIDE = 32

# A stage row of the config: torchvision's (Fused)MBConvConfig arguments, in their order.
STAGE_FIELDS = ("block", "expand_ratio", "kernel", "stride", "input_channels", "out_channels", "num_layers")
BLOCKS = {"fused": FusedMBConvConfig, "mb": MBConvConfig}

# ``pretrained: true``: torchvision's ImageNet weights, the official initialisation (weights=IMAGENET1K_V1).
IMAGENET_WEIGHTS = EfficientNet_V2_S_Weights.IMAGENET1K_V1
# File names looked for when ``pretrained`` is a directory, in order: torchvision's own (as in
# $TORCH_HOME/hub/checkpoints), then the Hugging Face names.
WEIGHT_FILE_NAMES = (IMAGENET_WEIGHTS.url.rsplit("/", 1)[-1], "model.safetensors", "pytorch_model.bin")

# The compressor's entry in the official Stage B checkpoint (``state_dict`` holds Stage B itself).
OFFICIAL_CHECKPOINT_KEY = "effnet_state_dict"

RETRAIN_HINT = (
    "retrain Stage B (`wurst-train stage=b experiment=tiny`, or your experiment) to get a compressor in it"
)


class SemanticCompressor(nn.Module):
    """EfficientNet features → 1×1 conv (no bias) → BatchNorm2d = the semantic latent z.

    Every architectural number comes from the config (conf/model/compressor/*.yaml), none has a default here.

    Args:
        stages: rows ``[block, expand_ratio, kernel, stride, input_channels, out_channels, num_layers]`` with
            block ``fused`` (torchvision ``FusedMBConvConfig``) or ``mb`` (``MBConvConfig``); the stem is a
            stride-2 3×3 conv to the first row's input channels, as in torchvision's ``EfficientNet``.
        last_channel: channels of the final 1×1 conv of the features (1280 for EfficientNetV2-S).
        norm_eps: the backbone's BatchNorm eps (1e-3 in torchvision's ``efficientnet_v2_s``).
        stochastic_depth_prob: the backbone's stochastic depth (0.2 in torchvision's ``efficientnet_v2_s``;
            active in training mode only, as in the official module).
        c_latent: channels of z (16).
        pretrained: False or None for random init (torchvision's EfficientNet init); True for torchvision's
            ImageNet ``efficientnet_v2_s`` weights (downloaded by torchvision into $TORCH_HOME); or a local
            path: a ``.pth`` / ``.bin`` / ``.safetensors`` file holding torchvision's ``efficientnet_v2_s``
            state dict (the full classifier model, whose ``classifier.*`` is ignored, or ``.features`` only),
            or a directory holding one of ``WEIGHT_FILE_NAMES``. ImageNet weights fit the paper stages only.
        backbone: the old format's timm model name. Refused: see :func:`_refuse_timm_backbone`.
    """

    def __init__(
        self,
        stages: Sequence[Sequence[Any]] | None = None,
        last_channel: int | None = None,
        norm_eps: float | None = None,
        stochastic_depth_prob: float | None = None,
        c_latent: int | None = None,
        pretrained: bool | str | Path | None = False,
        backbone: str | None = None,
    ):
        super().__init__()
        if backbone is not None:
            _refuse_timm_backbone(backbone)
        given = {
            "stages": stages,
            "last_channel": last_channel,
            "norm_eps": norm_eps,
            "stochastic_depth_prob": stochastic_depth_prob,
            "c_latent": c_latent,
        }
        missing = [name for name, value in given.items() if value is None]
        if missing:
            raise TypeError(
                f"SemanticCompressor: missing {missing}; build it from conf/model/compressor/paper.yaml "
                f"(EfficientNetV2-S) or conf/model/compressor/tiny.yaml"
            )
        self.c_latent = int(c_latent)
        # num_classes=1: the classifier head is built by torchvision's class and dropped at once; only
        # ``features`` is kept, as in the official module (no unused parameters under DDP).
        efficientnet = EfficientNet(
            _inverted_residual_setting(stages),
            dropout=0.0,
            stochastic_depth_prob=float(stochastic_depth_prob),
            num_classes=1,
            norm_layer=partial(nn.BatchNorm2d, eps=float(norm_eps)),
            last_channel=int(last_channel),
        )
        self.backbone = efficientnet.features
        # A plain Sequential(Conv2d, BatchNorm2d), as the official one: SyncBatchNorm conversion and the
        # ``mapper.*`` keys of the released weights depend on it.
        self.mapper = nn.Sequential(
            nn.Conv2d(int(last_channel), self.c_latent, kernel_size=1, bias=False),
            nn.BatchNorm2d(self.c_latent),
        )
        # Non-persistent: normalisation constants are code, not weights (the official state dict has none).
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        if pretrained is not None and pretrained is not False:
            self._load_imagenet_backbone(pretrained)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: ``[B, 3, H, W]`` in [0, 1] → z ``[B, c_latent, H/32, W/32]`` (ceil for odd sizes)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(
                f"SemanticCompressor: images must be [B, 3, H, W] RGB in [0, 1], got shape "
                f"{tuple(images.shape)}; add a batch axis or convert grayscale/RGBA to RGB"
            )
        x = (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)
        return self.mapper(self.backbone(x))

    def load_official_state_dict(self, checkpoint: str | Path | Mapping[str, Any]) -> SemanticCompressor:
        """Load the compressor of an official Stage B checkpoint strictly (every key, every shape).

        checkpoint: the path of ``model_v2_stage_b.pt`` (read with ``weights_only=True``), or the dict it holds,
        or its ``effnet_state_dict`` itself.
        """
        source = str(checkpoint) if isinstance(checkpoint, (str, Path)) else "the given checkpoint"
        state = read_official_state_dict(checkpoint) if isinstance(checkpoint, (str, Path)) else checkpoint
        if OFFICIAL_CHECKPOINT_KEY in state:
            state = state[OFFICIAL_CHECKPOINT_KEY]
        try:
            self.load_state_dict(dict(state), strict=True)
        except RuntimeError as error:
            raise ValueError(
                f"SemanticCompressor: {source}'s {OFFICIAL_CHECKPOINT_KEY} does not fit this compressor; the "
                f"official one is EfficientNetV2-S: build from conf/model/compressor/paper.yaml ({error})"
            ) from error
        return self

    def _load_imagenet_backbone(self, pretrained: bool | str | Path) -> None:
        if pretrained is True:
            try:
                state = IMAGENET_WEIGHTS.get_state_dict(progress=True, check_hash=True)
            except OSError as error:  # URLError is an OSError: offline, proxy, DNS
                raise OSError(
                    f"SemanticCompressor: pretrained=true could not fetch torchvision's {IMAGENET_WEIGHTS.url} "
                    f"({error}); offline, set pretrained to a local copy of that file"
                ) from error
            source = IMAGENET_WEIGHTS.url
        elif isinstance(pretrained, (str, Path)):
            path = _weights_file(Path(pretrained))
            state, source = _read_state_dict(path), str(path)
        else:
            raise TypeError(
                f"SemanticCompressor: pretrained must be True, False or a local weights path, got "
                f"{pretrained!r} ({type(pretrained).__name__})"
            )
        try:
            self.backbone.load_state_dict(_features_only(state), strict=True)
        except RuntimeError as error:
            raise ValueError(
                f"SemanticCompressor: pretrained weights {source} do not fit this backbone; torchvision's "
                f"ImageNet efficientnet_v2_s weights fit conf/model/compressor/paper.yaml's stages only; for "
                f"another stage table set pretrained: false ({error})"
            ) from error


def read_official_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """``effnet_state_dict`` of an official Stage B checkpoint file, read without unpickling code."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"SemanticCompressor: official checkpoint {path} does not exist; give the path of the released "
            f"model_v2_stage_b.pt"
        )
    # mmap: the file also holds Stage B (and optimiser state); only the compressor's tensors are read.
    checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if not isinstance(checkpoint, Mapping) or OFFICIAL_CHECKPOINT_KEY not in checkpoint:
        keys = sorted(checkpoint) if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
        raise ValueError(
            f"SemanticCompressor: {path} has no {OFFICIAL_CHECKPOINT_KEY!r} (it holds {keys}); give an official "
            f"Stage B checkpoint (model_v2_stage_b.pt), whose {OFFICIAL_CHECKPOINT_KEY!r} is the compressor"
        )
    return dict(checkpoint[OFFICIAL_CHECKPOINT_KEY])


def _refuse_timm_backbone(backbone: str) -> None:
    """Configs and exports of the old format named a timm model (``tf_efficientnetv2_s``, ``test_efficientnet``).
    Its weights have other keys and another arithmetic (TF padding, other eps), so nothing can load them."""
    raise ValueError(
        f"SemanticCompressor: backbone={backbone!r} is a timm model name from the old compressor format; the "
        f"compressor format changed to torchvision's EfficientNet features in the official Würstchen layout "
        f"(backbone.*, mapper.*), configured by stages/last_channel/norm_eps/stochastic_depth_prob. Build it "
        f"from conf/model/compressor/paper.yaml or tiny.yaml; a Stage B export with a timm compressor cannot be "
        f"loaded: {RETRAIN_HINT}"
    )


def _inverted_residual_setting(stages: Sequence[Sequence[Any]]) -> list[FusedMBConvConfig | MBConvConfig]:
    """Config rows → torchvision's block configs, checked so that torchvision never silently changes them."""
    if isinstance(stages, (str, bytes)) or not isinstance(stages, Sequence) or not stages:
        raise ValueError(
            f"SemanticCompressor: stages must be a non-empty list of rows {list(STAGE_FIELDS)}, got {stages!r}"
        )
    setting, stride = [], 2  # the stem halves the image
    for i, row in enumerate(stages):
        if isinstance(row, (str, bytes)) or not isinstance(row, Sequence) or len(row) != len(STAGE_FIELDS):
            raise ValueError(f"SemanticCompressor: stages[{i}] = {row!r} is not a row {list(STAGE_FIELDS)}")
        block, expand_ratio, kernel, row_stride, c_in, c_out, num_layers = row
        if block not in BLOCKS:
            raise ValueError(
                f"SemanticCompressor: stages[{i}] block {block!r} is not one of {sorted(BLOCKS)}"
            )
        cnf = BLOCKS[block](
            float(expand_ratio), int(kernel), int(row_stride), int(c_in), int(c_out), int(num_layers)
        )
        if (cnf.input_channels, cnf.out_channels) != (int(c_in), int(c_out)):  # MBConvConfig rounds to /8
            raise ValueError(
                f"SemanticCompressor: stages[{i}] channels {c_in}→{c_out} are not multiples of 8, which "
                f"torchvision's MBConvConfig would round to {cnf.input_channels}→{cnf.out_channels}; use those"
            )
        if setting and cnf.input_channels != setting[-1].out_channels:
            raise ValueError(
                f"SemanticCompressor: stages[{i}] takes {c_in} channels but stages[{i - 1}] gives "
                f"{setting[-1].out_channels}"
            )
        setting.append(cnf)
        stride *= int(row_stride)
    if stride != COMPRESSOR_STRIDE:
        raise ValueError(
            f"SemanticCompressor: stages give a total stride of {stride} (stem 2 × the rows' strides); the "
            f"compressor's latent must be at stride {COMPRESSOR_STRIDE}"
        )
    return setting


def _weights_file(path: Path) -> Path:
    """Resolve ``pretrained`` given as a file or a directory to one weights file."""
    if path.is_file():
        return path
    if path.is_dir():
        for name in WEIGHT_FILE_NAMES:
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(
            f"SemanticCompressor: pretrained directory {path} holds none of {list(WEIGHT_FILE_NAMES)}; point "
            f"pretrained at the weights file itself (torchvision's efficientnet_v2_s state dict)"
        )
    raise FileNotFoundError(
        f"SemanticCompressor: pretrained path {path} does not exist; give a local copy of torchvision's "
        f"{IMAGENET_WEIGHTS.url.rsplit('/', 1)[-1]} (or a directory holding it), or pretrained=true to let "
        f"torchvision download it"
    )


def _read_state_dict(path: Path) -> Mapping[str, torch.Tensor]:
    """A state dict from a local file, never unpickling code (``weights_only=True``)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(
            f"SemanticCompressor: pretrained file {path} does not hold a state dict (name → tensor); save it "
            f"with torch.save(torchvision.models.efficientnet_v2_s(weights=...).state_dict(), path)"
        )
    return state


def _features_only(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision's full model (``features.*`` + ``classifier.*``) or its ``features`` alone → ``features`` keys."""
    if any(name.startswith("features.") for name in state):
        return {
            name.removeprefix("features."): v for name, v in state.items() if name.startswith("features.")
        }
    return dict(state)
