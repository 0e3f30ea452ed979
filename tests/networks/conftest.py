"""Fixtures for the network tests (Stage A, B, C, the compressor, the text encoder, the diffusers converters):
configs from conf/, random weights."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

CONF_MODEL = Path(__file__).resolve().parents[2] / "conf" / "model"


def _build_from_conf(group: str, name: str, device: str | torch.device = "cpu") -> nn.Module:
    cfg = OmegaConf.load(CONF_MODEL / group / f"{name}.yaml")
    with torch.device(device):
        return instantiate(cfg)


def _randomize(module: nn.Module, std: float = 0.2, gain: float = 1.0, seed: int = 0) -> nn.Module:
    """Give every parameter and BatchNorm statistic a random value.

    Several parameters start at zero (GRN gamma/beta, Paella's gammas) and would hide a wrong formula
    behind an identity, so nothing keeps its initial value. Weight matrices get std 1/sqrt(fan_in) so that
    activations stay O(1) through deep stacks; vectors (biases, gammas, norms) get ``std``. Running
    variances stay positive.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if not tensor.is_floating_point():
                continue
            is_matrix = tensor.ndim >= 2 and tensor.shape[0] > 1
            scale = gain * (tensor.numel() / tensor.shape[0]) ** -0.5 if is_matrix else std
            noise = torch.randn(tensor.shape, generator=generator) * scale
            tensor.copy_(noise.abs() + 0.5 if name.endswith("running_var") else noise)
    return module


@pytest.fixture
def build_from_conf() -> Callable[..., nn.Module]:
    """``build_from_conf(group, name, device="cpu")``: instantiate conf/model/<group>/<name>.yaml."""
    return _build_from_conf


@pytest.fixture
def randomize() -> Callable[..., nn.Module]:
    """``randomize(module, std=0.2, seed=0)``: random values in every float tensor of the state dict."""
    return _randomize


@pytest.fixture
def randomise():
    """Overwrite every parameter with noise, so zero-initialised parts (GRN, clf, mappers) count too."""

    def _randomise(module: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in module.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
        return module

    return _randomise


@pytest.fixture
def model_conf():
    """Load ``conf/model/<group>/<name>.yaml`` (Hydra config) as an OmegaConf node."""

    def _load(group: str, name: str):
        return OmegaConf.load(CONF_MODEL / group / f"{name}.yaml")

    return _load


@pytest.fixture(scope="module")
def tiny_text_encoder():
    return instantiate(OmegaConf.load(CONF_MODEL / "text_encoder" / "tiny.yaml"))


# ----- the semantic compressor's real consumer: the official module and checkpoint format -------------
class OfficialEfficientNetEncoder(nn.Module):
    """The official compressor as the Würstchen v2 Stage B script builds it (dome272 ``modules.py``
    ``EfficientNetEncoder``, copied in diffusers' ``examples/wuerstchen``), from torchvision's classes, without
    the ImageNet download: ``efficientnet_v2_s().features`` as ``backbone`` → ``mapper``. It receives
    ImageNet-normalised images (the script's ``effnet_preprocess``)."""

    def __init__(self, c_latent: int = 16):
        super().__init__()
        self.backbone = torchvision.models.efficientnet_v2_s().features
        self.mapper = nn.Sequential(
            nn.Conv2d(1280, c_latent, kernel_size=1, bias=False), nn.BatchNorm2d(c_latent)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mapper(self.backbone(x))


def _imagenet_normalise(images: torch.Tensor) -> torch.Tensor:
    """What the official scripts feed the compressor: torchvision's Normalize with ImageNet mean/std."""
    return torchvision.transforms.functional.normalize(
        images, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]
    )


@pytest.fixture
def official_encoder() -> type[OfficialEfficientNetEncoder]:
    """The official compressor class (build it under ``torch.device("meta")`` for shapes only)."""
    return OfficialEfficientNetEncoder


@pytest.fixture
def official_preprocess() -> Callable[[torch.Tensor], torch.Tensor]:
    """images in [0, 1] → the ImageNet-normalised input the official compressor is fed."""
    return _imagenet_normalise


def _with_live_batchnorms(module: nn.Module, seed: int = 0) -> nn.Module:
    """Random BatchNorm affines, then running statistics measured on random ImageNet-normalised images.

    :func:`_randomize` would make a 40-block EfficientNet collapse to its last BatchNorm's bias (the latent
    would not depend on the image), so the convolutions keep torchvision's random init and every BatchNorm gets
    a random affine and the statistics of its actual input: then z is O(1) and depends on every layer."""
    generator = torch.Generator().manual_seed(seed)
    norms = [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for norm in norms:
            norm.weight.copy_(1 + 0.3 * torch.randn(norm.weight.shape, generator=generator))
            norm.bias.copy_(0.3 * torch.randn(norm.bias.shape, generator=generator))
            norm.reset_running_stats()
            norm.momentum = None  # cumulative average over the calibration batches
        module.eval()
        for norm in norms:
            norm.train()  # only the BatchNorms: stochastic depth stays off
        for _ in range(2):
            module(_imagenet_normalise(torch.rand(4, 3, 64, 64, generator=generator)))
        for norm in norms:
            norm.momentum = 0.1
    return module.eval()


@pytest.fixture(scope="module")
def official_compressor() -> OfficialEfficientNetEncoder:
    """The official module with random weights, random BatchNorm affines and live BatchNorm statistics (eval)."""
    torch.manual_seed(3)  # torchvision's init draws from the global generator
    return _with_live_batchnorms(OfficialEfficientNetEncoder(), seed=3)


def _compressor_conf(name: str, **overrides: Any) -> dict[str, Any]:
    cfg = OmegaConf.to_container(OmegaConf.load(CONF_MODEL / "compressor" / f"{name}.yaml"))
    return {**cfg, "pretrained": False, **overrides}


@pytest.fixture
def compressor_conf() -> Callable[..., dict[str, Any]]:
    """``compressor_conf(name, **overrides)``: conf/model/compressor/<name>.yaml as a plain dict, with no
    ImageNet download unless ``pretrained`` is overridden."""
    return _compressor_conf


@pytest.fixture(scope="module")
def tiny_compressor() -> nn.Module:
    """conf/model/compressor/tiny.yaml, random init, eval mode."""
    return instantiate(_compressor_conf("tiny")).eval()
