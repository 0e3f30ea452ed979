"""The optimiser recipe shared by the three stages: AdamW (fused where the device allows) or
bitsandbytes AdamW8bit, and a linear warm-up (REFERENCE.md: lr 1e-4, 10,000 warm-up steps)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch


def build_optimizer(param_groups: Iterable[dict[str, Any]], cfg: Mapping[str, Any]) -> torch.optim.Optimizer:
    """``cfg``: name (adamw | adamw8bit), lr, betas, weight_decay, eps, fused (auto | true | false)."""
    name = str(cfg.get("name", "adamw")).lower()
    # Parameters as lists: a generator (module.parameters()) would be consumed by the device check below,
    # leaving the optimiser without its first parameter on CPU and without any on a GPU.
    groups = [{**group, "params": list(group["params"])} for group in param_groups]
    kwargs = {
        "lr": float(cfg["lr"]),
        "betas": tuple(cfg.get("betas", (0.9, 0.999))),
        "weight_decay": float(cfg.get("weight_decay", 0.01)),
        "eps": float(cfg.get("eps", 1e-8)),
    }
    if name == "adamw":
        on_gpu = all(p.is_cuda for g in groups for p in g["params"])
        fused = cfg.get("fused", "auto")
        kwargs["fused"] = on_gpu if fused == "auto" else bool(fused)
        return torch.optim.AdamW(groups, **kwargs)
    if name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as err:  # pragma: no cover - bitsandbytes is a dependency
            raise RuntimeError("optim.name=adamw8bit needs bitsandbytes: pip install bitsandbytes") from err
        return bnb.optim.AdamW8bit(groups, **kwargs)
    raise ValueError(f"optim.name={name!r} is not known; use 'adamw' or 'adamw8bit'")


def linear_warmup(optimizer: torch.optim.Optimizer, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """lr ramps linearly from lr/warmup to lr over ``warmup_steps`` steps, then stays."""
    warmup = max(int(warmup_steps), 0)

    def factor(step: int) -> float:
        return 1.0 if warmup == 0 else min(1.0, (step + 1) / warmup)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
