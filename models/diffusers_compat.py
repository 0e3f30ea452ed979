"""Converters between our stage networks and diffusers' Würstchen classes (REFERENCE.md "The cascade").

Our modules use diffusers' module and parameter names, so a state dict moves across unchanged; what a
converter adds is (1) a check that keys and shapes really agree, with a readable report when they do
not, and (2) the mapping of constructor arguments between our classes and diffusers' configs.

| ours   | diffusers (``diffusers.pipelines.deprecated.wuerstchen``) | arguments only we have |
|--------|-----------------------------------------------------------|------------------------|
| StageA | PaellaVQModel                                             | beta (diffusers fixes 0.25) |
| StageB | WuerstchenDiffNeXt                                        | gradient_checkpointing |
| StageC | WuerstchenPrior                                           | gradient_checkpointing |

This is the only file in ``models/`` that imports diffusers.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.pipelines.deprecated.wuerstchen import PaellaVQModel, WuerstchenDiffNeXt, WuerstchenPrior
from torch import nn

from wurst.models.stage_a import StageA
from wurst.models.stage_b import StageB
from wurst.models.stage_c import StageC

# How many differences of each kind a mismatch report lists before summarising the rest.
_REPORT_LIMIT = 10


@dataclass(frozen=True)
class _Pair:
    ours: type[nn.Module]
    theirs: type[nn.Module]
    # Our constructor arguments that diffusers' class does not take (they do not change the weights).
    ours_only: tuple[str, ...]


def _pairs() -> list[_Pair]:
    return [
        _Pair(StageA, PaellaVQModel, ("beta",)),
        _Pair(StageC, WuerstchenPrior, ("gradient_checkpointing",)),
        _Pair(StageB, WuerstchenDiffNeXt, ("gradient_checkpointing",)),
    ]


def _pair_for(model: nn.Module) -> _Pair:
    for pair in _pairs():
        if isinstance(model, (pair.ours, pair.theirs)):
            return pair
    known = ", ".join(f"{p.ours.__name__} ↔ {p.theirs.__name__}" for p in _pairs())
    raise TypeError(f"no diffusers converter for {type(model).__name__}; known pairs: {known}")


def _init_arg_names(cls: type) -> list[str]:
    params = inspect.signature(cls.__init__).parameters.values()
    return [p.name for p in params if p.name != "self" and p.kind is p.POSITIONAL_OR_KEYWORD]


def _constructor_kwargs(model: nn.Module) -> dict[str, Any]:
    """Our model's constructor kwargs: its ``config`` dict, else same-named attributes."""
    config = getattr(model, "config", None)
    if isinstance(config, Mapping):
        return dict(config)
    names = _init_arg_names(type(model))
    missing = [n for n in names if not hasattr(model, n)]
    if missing:
        raise ValueError(
            f"cannot read the constructor arguments of {type(model).__name__}: it has no `config` dict and no "
            f"attributes {missing}; store the constructor kwargs as `self.config` in its __init__"
        )
    return {n: getattr(model, n) for n in names}


def state_dict_differences(ours: Mapping[str, torch.Tensor], theirs: Mapping[str, torch.Tensor]) -> list[str]:
    """Human-readable differences in keys and shapes between two state dicts (empty when they agree)."""
    only_ours = sorted(set(ours) - set(theirs))
    only_theirs = sorted(set(theirs) - set(ours))
    shapes = [
        f"{k}: ours {tuple(ours[k].shape)} vs diffusers {tuple(theirs[k].shape)}"
        for k in sorted(set(ours) & set(theirs))
        if tuple(ours[k].shape) != tuple(theirs[k].shape)
    ]
    report = []
    for title, items in (("only in ours", only_ours), ("only in diffusers", only_theirs), ("shape", shapes)):
        if items:
            listed = "; ".join(items[:_REPORT_LIMIT])
            more = f"; … and {len(items) - _REPORT_LIMIT} more" if len(items) > _REPORT_LIMIT else ""
            report.append(f"{len(items)} key(s) {title}: {listed}{more}")
    return report


def check_state_dict_compatible(
    ours: nn.Module | Mapping[str, torch.Tensor], theirs_cls: type[nn.Module], config: Mapping[str, Any]
) -> None:
    """Raise ``ValueError`` listing every key/shape difference between ``ours`` and ``theirs_cls(**config)``.

    The diffusers model is built on the meta device, so this costs no memory even at paper size.

    Args:
        ours: one of our networks or its state dict.
        theirs_cls: ``PaellaVQModel``, ``WuerstchenDiffNeXt`` or ``WuerstchenPrior``.
        config: diffusers constructor arguments for ``theirs_cls``.
    """
    ours_sd = ours.state_dict() if isinstance(ours, nn.Module) else ours
    with torch.device("meta"):
        theirs_sd = theirs_cls(**config).state_dict()
    report = state_dict_differences(ours_sd, theirs_sd)
    if report:
        raise ValueError(
            f"state dict is not compatible with diffusers {theirs_cls.__name__}({dict(config)}):\n  "
            + "\n  ".join(report)
            + "\nbuild our network with the same constructor arguments as the diffusers config"
        )


def _load_into(target_cls: type[nn.Module], kwargs: dict[str, Any], source: nn.Module) -> nn.Module:
    """Build ``target_cls(**kwargs)`` without initialising it and fill it with copies of ``source``'s tensors."""
    with torch.device("meta"):
        target = target_cls(**kwargs)
    # Copies, so the converted model never aliases the source's storage.
    state = {k: v.detach().clone() for k, v in source.state_dict().items()}
    report = state_dict_differences(state, target.state_dict())
    if report:
        raise ValueError(
            f"{type(source).__name__} weights do not fit {target_cls.__name__}({kwargs}):\n  "
            + "\n  ".join(report)
        )
    target.load_state_dict(state, strict=True, assign=True)
    return target.train(source.training)


def diffusers_config(model: nn.Module) -> dict[str, Any]:
    """The diffusers constructor arguments equivalent to our ``model``'s."""
    pair = _pair_for(model)
    kwargs = _constructor_kwargs(model)
    theirs_args = set(_init_arg_names(pair.theirs))
    unknown = sorted(set(kwargs) - theirs_args - set(pair.ours_only))
    if unknown:
        raise ValueError(
            f"{pair.ours.__name__} arguments {unknown} have no counterpart in diffusers {pair.theirs.__name__}; "
            "the converter's table of our-only arguments needs them"
        )
    return {k: v for k, v in kwargs.items() if k in theirs_args}


def to_diffusers(model: nn.Module) -> nn.Module:
    """Our StageA/StageB/StageC → the equivalent diffusers model holding copies of the same weights.

    The result keeps ``model``'s device, dtype, train/eval mode and gradient-checkpointing switch.
    """
    pair = _pair_for(model)
    if not isinstance(model, pair.ours):
        raise TypeError(f"to_diffusers expects one of our networks; got diffusers {type(model).__name__}")
    dmodel = _load_into(pair.theirs, diffusers_config(model), model)
    if isinstance(model, StageA):
        # PaellaVQModel has no beta argument; set its quantizer's so that its VQ loss equals ours (the value
        # is not saved by diffusers' save_pretrained, which always rebuilds with 0.25).
        dmodel.vquantizer.beta = model.vquantizer.beta
    if getattr(model, "gradient_checkpointing", False):
        dmodel.enable_gradient_checkpointing()
    return dmodel


def from_diffusers(dmodel: nn.Module) -> nn.Module:
    """A diffusers ``PaellaVQModel``/``WuerstchenDiffNeXt``/``WuerstchenPrior`` → our network with copies of its weights.

    Load public weights with diffusers first, e.g.
    ``from_diffusers(WuerstchenPrior.from_pretrained(path, subfolder="prior"))``.
    """
    pair = _pair_for(dmodel)
    if not isinstance(dmodel, pair.theirs):
        raise TypeError(f"from_diffusers expects a diffusers model; got our {type(dmodel).__name__}")
    theirs_args = _init_arg_names(pair.theirs)
    kwargs = {k: v for k, v in dmodel.config.items() if k in theirs_args}
    kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}
    if pair.ours is StageA:
        kwargs["beta"] = dmodel.vquantizer.beta  # diffusers fixes it inside its VectorQuantizer
    else:
        kwargs["gradient_checkpointing"] = bool(getattr(dmodel, "is_gradient_checkpointing", False))
    return _load_into(pair.ours, kwargs, dmodel)
