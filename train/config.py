"""Hydra plumbing: the config directory and the resolvers the configs use."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def _precision() -> str:
    # bf16 autocast on GPUs (REFERENCE.md recipe); full fp32 on CPU, where bf16 is slow and imprecise.
    return "bf16-mixed" if torch.cuda.is_available() else "32-true"


def _sweep_member() -> str:
    """``""`` for a single run; ``"/sweep-<id>/<n>"`` for member n of a --multirun, so sweep members
    train in their own run directories (beside, not over, the single run's)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
    except (ImportError, ValueError):
        return ""
    if hc.mode != RunMode.MULTIRUN:
        return ""
    return f"/sweeps/{Path(hc.sweep.dir).name}/{hc.job.num}"


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("wurst_precision"):
        OmegaConf.register_new_resolver("wurst_precision", _precision)
    if not OmegaConf.has_resolver("wurst_sweep_member"):
        OmegaConf.register_new_resolver("wurst_sweep_member", _sweep_member)


register_resolvers()
