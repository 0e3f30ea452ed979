"""LoRA adapters (peft) on a stage network's attention and feed-forward linears.

A LoRA fine-tune freezes the network and trains a low-rank update ``W + (alpha / r)·B·A`` on the
linears named in ``conf/lora/*.yaml``: for Stage C the attention projections (``to_q``, ``to_k``,
``to_v``, ``to_out.0``, as diffusers' ``train_text_to_image_lora_prior.py``) and the ResBlock MLPs
(``channelwise.0``, ``channelwise.4``). peft injects the layers in place, so module paths stay the
network's own and the adapter's keys (``blocks.2.attention.to_q.lora_A.weight``) are those
diffusers' ``load_lora_weights`` expects under the ``prior.`` prefix.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

ADAPTER = "default"


def lora_settings(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The ``LoraConfig`` kwargs of a ``conf/lora`` node (also the adapter metadata diffusers reads)."""
    targets = list(spec["target_modules"])
    if not targets:
        raise ValueError("lora.target_modules is empty: name the linears to adapt, e.g. [to_q, to_k, to_v, to_out.0]")
    return {
        "r": int(spec["rank"]),
        "lora_alpha": float(spec.get("alpha", spec["rank"])),
        "target_modules": targets,
        "lora_dropout": float(spec.get("dropout", 0.0)),
        "bias": "none",
        "init_lora_weights": True,
    }


def add_adapters(network: nn.Module, spec: Mapping[str, Any]) -> nn.Module:
    """Injects LoRA layers into ``network`` in place and freezes everything else.

    ``lora_B`` starts at zero, so the adapted network computes exactly the base network's function.
    """
    from peft import LoraConfig, inject_adapter_in_model

    settings = lora_settings(spec)
    inject_adapter_in_model(LoraConfig(**settings), network, adapter_name=ADAPTER)
    adapted = 0
    for name, parameter in network.named_parameters():
        is_adapter = ".lora_" in name
        parameter.requires_grad_(is_adapter)
        adapted += is_adapter
    if adapted == 0:
        raise ValueError(
            f"lora.target_modules={settings['target_modules']} matched no linear of {type(network).__name__}; "
            "use names ending a module path, e.g. to_q or channelwise.0"
        )
    return network


def has_adapters(network: nn.Module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in network.modules())


def adapter_state_dict(network: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors, keyed by module path (``blocks.2.attention.to_q.lora_A.weight``)."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(network, adapter_name=ADAPTER)
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def adapter_parameter_names(network: nn.Module) -> list[str]:
    return [name for name, p in network.named_parameters() if ".lora_" in name]


def merged_network(network: nn.Module) -> nn.Module:
    """A plain copy of ``network`` with every adapter folded into its base weight (W + scale·B·A),
    the peft layers replaced by their base linears: the state dict of the un-adapted class."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    merged = copy.deepcopy(network)
    for name, module in list(merged.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge(safe_merge=True)
            parent_name, _, child = name.rpartition(".")
            parent = merged.get_submodule(parent_name) if parent_name else merged
            setattr(parent, child, module.get_base_layer())
    return merged.requires_grad_(False)
