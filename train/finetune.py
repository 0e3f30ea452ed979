"""Fine-tuning Stage C (or Stage B) from a pipeline directory: full weights or LoRA adapters.

The base is a pipeline directory (one of ours, or one ``wurst-export import`` made from the release):
Stage C's network, text encoder and hand-off come from ``<base>/stage_c/export``, the frozen compressor
from ``<base>/stage_b/export``. Training is Stage C's own (paper loss, p2 weight, 5% caption dropout).

With ``lora`` set, peft adapters go on the linears ``conf/lora/*.yaml`` names and only they train.
A LoRA checkpoint holds the adapters, the optimiser, schedulers and loop state, not the frozen base
(which is re-read from the base export on resume, so a resumed run is the uninterrupted one). The
export holds the merged weights as ``model.safetensors`` (what the cascade and ``wurst-export``
consume) and the adapter as ``lora/pytorch_lora_weights.safetensors`` in diffusers' layout.

Stage B (``FinetuneStageBModule``, LoRA only in ``conf/experiment/finetune``): network, compressor and
text encoder from ``<base>/stage_b/export``, Stage A from ``<base>/stage_a/export``; with LoRA the
compressor is frozen too (in eval mode), so the decoder adapts to the base's semantic latents.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from wurst.models.hub.lora_export import COMPONENT, lora_model_card, write_lora_folder
from wurst.models.hub.pipeline_dir import canonical_config
from wurst.train.export import ALLOWED_TARGETS, read_config, read_provenance, require_export
from wurst.train.lora import (
    adapter_parameter_names,
    adapter_state_dict,
    add_adapters,
    lora_settings,
    merged_network,
)
from wurst.train.stage_b_module import StageBModule
from wurst.train.stage_c_module import StageCModule

log = logging.getLogger(__name__)

# Parameter groups that never train in a fine-tune and are rebuilt from the base at start-up.
FROZEN_PREFIXES = ("network.", "text_encoder.", "compressor.", "stage_a.")


def base_export(base: str | Path) -> Path:
    """``<base>/stage_c/export``, checked (network and text encoder) before anything is built."""
    return require_export(Path(base) / "stage_c" / "export", "c", names=("model", "text_encoder"),
                          why="finetune.base is the pipeline the fine-tune starts from")


def exported_text_encoder_config(export_dir: Path) -> dict[str, Any]:
    config = canonical_config(read_config(export_dir, "text_encoder"))
    if config.get("_target_") not in ALLOWED_TARGETS:
        raise ValueError(f"{export_dir}/text_encoder_config.json names {config.get('_target_')!r}, not a text encoder")
    if (export_dir / "text_encoder.safetensors").is_file():  # weights travel with the export: never download
        config["pretrained"] = False if isinstance(config.get("pretrained"), bool) else None
    return config


class LoraFinetune:
    """What a fine-tune adds to a stage module: the base's configs in the export, and with LoRA the
    adapters (checkpoints of adapters + optimiser, merged export weights, the diffusers-layout adapter)."""

    stage: str
    lora: dict[str, Any] | None
    network: nn.Module

    def start_adapters(self, lora: dict[str, Any] | None) -> None:
        self.lora = lora
        if lora:
            add_adapters(self.network, lora)
            self.strict_loading = False  # checkpoints omit the frozen base (on_save_checkpoint)

    # -- checkpoints: adapters + optimiser, not the frozen base ----------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.lora:
            state = checkpoint["state_dict"]
            for key in [k for k in state if k.startswith(FROZEN_PREFIXES) and ".lora_" not in k]:
                del state[key]
            checkpoint["lora_base"] = self.base

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        if self.lora:
            expected = {f"network.{name}" for name in adapter_parameter_names(self.network)}
            missing = sorted(expected - checkpoint["state_dict"].keys())
            if missing:
                raise KeyError(f"the checkpoint lacks {len(missing)} adapter tensors of this LoRA config "
                               f"(e.g. {missing[:2]}): was it written with other lora.rank/target_modules?")
            saved_base = checkpoint.get("lora_base")
            if saved_base is not None and Path(saved_base).resolve() != Path(self.base).resolve():
                log.warning("resuming a LoRA checkpoint written on base %s with finetune.base=%s: the adapters "
                            "continue on this base's weights", saved_base, self.base)

    # -- export -----------------------------------------------------------------------------------
    def export_network(self) -> nn.Module:
        network = super().export_network()
        return merged_network(network) if self.lora else network

    def export_config_updates(self) -> dict[str, Any]:
        return dict(self.base_config)

    def write_export_extras(self, export_dir: Path, provenance: Mapping[str, Any]) -> None:
        """``export/lora/``: the adapter where diffusers' ``load_lora_weights`` finds it, and its card."""
        if not self.lora:
            return
        settings = lora_settings(self.lora)
        config = provenance.get("config", {})
        data = config.get("data", {})
        source = str((data.get("image_folder") or {}).get("path") or data.get("shards") or "?")
        counts = provenance.get("dataset", {})
        try:
            base_provenance = read_provenance(Path(self.base) / f"stage_{self.stage}" / "export")
        except (OSError, ValueError):
            base_provenance = {}
        imported = base_provenance.get("imported_from") or {}
        origin = str(imported.get("source") or "")
        # A Hub repo id is named as the base_model; local paths are not published, only their last part.
        repo_id = origin if origin.count("/") == 1 and not origin.startswith((".", "/", "~")) else None
        described = (f"imported from {repo_id or Path(origin).name} ({imported.get('format', 'diffusers folder')})"
                     if imported else f"a wurst pipeline, group {base_provenance.get('group', '?')}")
        card = lora_model_card(
            base=repo_id or Path(self.base).name, base_description=described, repo_id=repo_id,
            data=f"`{Path(source).name if '://' not in source else source}` ({counts.get('shards', '?')} shard(s), "
                 f"samples seen {provenance.get('samples_seen', '?')}; captions dropped for {self.text_dropout:.0%} "
                 "of batches)",
            steps=int(provenance.get("steps", 0)), settings=settings, stage=self.stage,
        )
        write_lora_folder(export_dir / "lora", adapter_state_dict(self.network), settings, COMPONENT[self.stage], card)


class FinetuneStageCModule(LoraFinetune, StageCModule):
    """Stage C started from ``base``'s Stage C; ``lora``: a ``conf/lora`` node, or None for full fine-tuning."""

    def __init__(self, base: str, lora: Mapping[str, Any] | None = None, network: Mapping[str, Any] | None = None,
                 text_encoder: Mapping[str, Any] | None = None, **stage_c: Any):
        c_dir = base_export(base)
        # The base's own constructor configs: the configured ones only name the architecture of a fresh run.
        network = canonical_config(read_config(c_dir))
        text_encoder = exported_text_encoder_config(c_dir)
        stage_c["measure_latent_stats"] = False  # the base's hand-off stays the hand-off
        lora = dict(lora) if lora else None
        if lora and stage_c.get("ema") and dict(stage_c["ema"]).get("enabled", True):
            raise ValueError("a LoRA fine-tune trains no EMA (ema.enabled=false, as conf/experiment/finetune/stage_c_lora.yaml "
                             "sets): the adapters are the fine-tuned weights")
        super().__init__(network=network, text_encoder=text_encoder, **stage_c)
        self.stage = "c"
        self.base = str(base)
        self.base_config = network
        self.text_encoder_config = text_encoder
        state = load_file(str(c_dir / "model.safetensors"))
        self.network.load_state_dict(state)
        if self.ema is not None:
            self.ema.shadow.load_state_dict(state)
        if (c_dir / "text_encoder.safetensors").is_file():
            self.text_encoder.load_state_dict(load_file(str(c_dir / "text_encoder.safetensors")))
        hand_off = c_dir / "hand_off.json"
        if hand_off.is_file():
            values = json.loads(hand_off.read_text())
            self.hand_off.copy_(torch.tensor([float(values["latent_mean"]), float(values["latent_std"])]))
        self.start_adapters(lora)


class FinetuneStageBModule(LoraFinetune, StageBModule):
    """Stage B started from ``base``'s Stage B and compressor; ``lora``: a ``conf/lora`` node, or None."""

    def __init__(self, base: str, lora: Mapping[str, Any] | None = None, network: Mapping[str, Any] | None = None,
                 compressor: Mapping[str, Any] | None = None, text_encoder: Mapping[str, Any] | None = None,
                 **stage_b: Any):
        b_dir = require_export(Path(base) / "stage_b" / "export", "b", names=("model", "compressor", "text_encoder"),
                               why="finetune.base is the pipeline the fine-tune starts from")
        network = canonical_config(read_config(b_dir))
        compressor = canonical_config(read_config(b_dir, "compressor"))
        if "pretrained" in compressor:  # the export holds the weights: never download an initialisation
            compressor["pretrained"] = False if isinstance(compressor["pretrained"], bool) else None
        text_encoder = exported_text_encoder_config(b_dir)
        lora = dict(lora) if lora else None
        if lora and stage_b.get("ema") and dict(stage_b["ema"]).get("enabled", True):
            raise ValueError("a LoRA fine-tune trains no EMA (ema.enabled=false, as conf/experiment/finetune/"
                             "stage_b_lora.yaml sets): the adapters are the fine-tuned weights")
        super().__init__(network=network, compressor=compressor, text_encoder=text_encoder, **stage_b)
        self.stage = "b"
        self.base = str(base)
        self.base_config = network
        self.text_encoder_config = text_encoder
        state = load_file(str(b_dir / "model.safetensors"))
        self.network.load_state_dict(state)
        if self.ema is not None:
            self.ema.shadow.load_state_dict(state)
        self.compressor.load_state_dict(load_file(str(b_dir / "compressor.safetensors")))
        if (b_dir / "text_encoder.safetensors").is_file():
            self.text_encoder.load_state_dict(load_file(str(b_dir / "text_encoder.safetensors")))
        if lora:  # frozen; eval now, as Lightning does not call train() at the start of fit
            self.compressor.requires_grad_(False).eval()
        self.start_adapters(lora)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.lora:
            self.compressor.eval()  # frozen with the base's BatchNorm statistics
        return self

    def trainable_param_groups(self) -> list[dict[str, Any]]:
        if self.lora:
            return [{"params": [p for p in self.network.parameters() if p.requires_grad]}]
        return super().trainable_param_groups()
