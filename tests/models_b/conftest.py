"""Shared fixtures for Stage B, the semantic compressor and the text encoder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

CONF_MODEL = Path(__file__).resolve().parents[2] / "conf" / "model"


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
