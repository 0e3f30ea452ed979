"""Fixtures for the network tests (Stage A, B, C, the compressor, the text encoder, the diffusers converters):
configs from conf/, random weights."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
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
