"""A LoRA adapter in the file layout diffusers' LoRA loaders read.

``WuerstchenPriorPipeline`` inherits ``StableDiffusionLoraLoaderMixin`` with ``unet_name = "prior"``:
``load_lora_weights(folder)`` reads ``folder/pytorch_lora_weights.safetensors``, keeps the keys under
``prior.`` (``prior.blocks.2.attention.to_q.lora_A.weight``: peft's key names, no adapter name) and
builds the peft ``LoraConfig`` from the safetensors metadata entry ``lora_adapter_metadata`` (a JSON
dict of ``LoraConfig`` kwargs, each prefixed ``prior.``), the layout its ``save_lora_weights`` writes
(diffusers 0.42, ``loaders/lora_base.py``). With the metadata, rank, alpha and target modules are
read, not guessed from shapes. ``pipe.prior_pipe.load_lora_weights(folder)`` then adapts the prior of
a ``WuerstchenCombinedPipeline``.

Stage B's ``WuerstchenDecoderPipeline`` has no LoRA loader; its adapter is written in the same file
layout under ``decoder.`` for peft / our loader, and its merged weights are the diffusers-loadable form.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"
COMPONENT = {"c": "prior", "b": "decoder"}


def write_lora_folder(folder: str | Path, adapter: Mapping[str, torch.Tensor], settings: Mapping[str, Any],
                      component: str = "prior", card: str | None = None) -> Path:
    """Writes ``folder/pytorch_lora_weights.safetensors`` (+ ``README.md`` when ``card`` is given).

    ``adapter``: peft's adapter state dict of the network (``<module path>.lora_A.weight`` ...);
    ``settings``: its ``LoraConfig`` kwargs. The file is written to a temporary name and renamed.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    bad = [k for k in adapter if ".lora_" not in k]
    if bad:
        raise ValueError(f"not adapter tensors (diffusers refuses keys without 'lora'): {bad[:3]}")
    tensors = {f"{component}.{k}": v.detach().cpu().contiguous() for k, v in adapter.items()}
    metadata = {f"{component}.{k}": (list(v) if isinstance(v, (set, tuple)) else v) for k, v in settings.items()}
    path = folder / LORA_WEIGHTS
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(tensors, str(tmp), metadata={"format": "pt", METADATA_KEY: json.dumps(metadata, indent=2, sort_keys=True)})
    os.replace(tmp, path)
    if card is not None:
        (folder / "README.md").write_text(card)
    return path


def read_lora_folder(folder: str | Path, component: str = "prior") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The adapter tensors (prefix removed) and ``LoraConfig`` kwargs of a folder ``write_lora_folder`` wrote."""
    path = Path(folder) / LORA_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: export a LoRA run (its export/lora folder) first")
    with safe_open(str(path), "pt") as f:
        raw = (f.metadata() or {}).get(METADATA_KEY)
    prefix = f"{component}."
    settings = {k.removeprefix(prefix): v for k, v in json.loads(raw or "{}").items() if k.startswith(prefix)}
    tensors = {k.removeprefix(prefix): v for k, v in load_file(str(path)).items() if k.startswith(prefix)}
    return tensors, settings


def lora_model_card(base: str, base_description: str, data: str, steps: int, settings: Mapping[str, Any],
                    stage: str = "c", repo_id: str | None = None) -> str:
    """A short model card: the base model, the data, the adapter settings and how to load it.
    ``repo_id``: the base's Hub repository, when it has one (the card's ``base_model``)."""
    component = COMPONENT[stage]
    load = (
        "```python\nfrom diffusers import WuerstchenCombinedPipeline\n\n"
        "pipe = WuerstchenCombinedPipeline.from_pretrained(\"<the base model's diffusers folder or repo>\")\n"
        "pipe.prior_pipe.load_lora_weights(\"<this folder>\")\nimage = pipe(\"your prompt\").images[0]\n```\n"
        if stage == "c"
        else "diffusers' WuerstchenDecoderPipeline has no LoRA loader: use the merged weights "
        "(`export/model.safetensors`, exported with `wurst-export`) or peft's `set_peft_model_state_dict`.\n"
    )
    return (
        "---\nlibrary_name: diffusers\ntags:\n- wuerstchen\n- lora\n- text-to-image\n"
        + (f"base_model: {repo_id}\n" if repo_id else "") + "---\n\n"
        f"# Würstchen Stage {stage.upper()} LoRA\n\n"
        f"- Base model: `{base}` ({base_description})\n"
        f"- Data: {data}\n"
        f"- Steps: {steps}\n"
        f"- Adapter: rank {settings['r']}, alpha {settings['lora_alpha']}, on the {component}'s "
        f"{', '.join(f'`{t}`' for t in settings['target_modules'])} linears\n\n"
        f"## Use\n\n{load}"
    )
