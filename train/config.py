"""Hydra plumbing: the config directory and the resolvers the configs use."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def _precision() -> str:
    # bf16 autocast on GPUs (REFERENCE.md recipe); full fp32 on CPU, where bf16 is slow and imprecise.
    return "bf16-mixed" if torch.cuda.is_available() else "32-true"


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("wurst_precision"):
        OmegaConf.register_new_resolver("wurst_precision", _precision)


register_resolvers()
