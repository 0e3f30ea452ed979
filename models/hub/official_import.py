"""The original Würstchen v2 checkpoints → our pipeline directory (with the semantic compressor).

The authors released PyTorch pickles, not diffusers folders:

| file                    | key                 | holds                                                  |
|-------------------------|---------------------|--------------------------------------------------------|
| ``vqgan_f4_v1_500k.pt`` | ``state_dict``      | Stage A (Paella's VQModel)                             |
| ``model_v2_stage_b.pt`` | ``state_dict``      | Stage B (DiffNeXt)                                     |
|                         | ``effnet_state_dict`` | the semantic compressor (EfficientNetEncoder)        |
| ``model_v3_stage_c.pt`` | ``ema_state_dict``  | Stage C (the prior's EMA weights)                      |

Their tensors already carry diffusers' (and so our) parameter names except in two places, the ones
diffusers' own conversion script rewrites: attention is ``nn.MultiheadAttention`` (``attn.in_proj_*`` holds
q, k and v stacked; ``attn.out_proj``), and Stage A's codebook is ``vquantizer.codebook``. Files are read
with ``torch.load(weights_only=True)``: tensors only, never pickled code.

The checkpoints hold no text encoders and no constructor configs: the networks are the paper's
(``conf/model/*/paper.yaml``) unless other configs are given, and each text encoder is written as a
config naming its pretrained weights (an open_clip tag, or a local checkpoint for offline clusters).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from wurst.models.cascade import check_cascade_configs
from wurst.models.hub.diffusers_export import (
    HAND_OFF_FILE,
    PIPELINE_HAND_OFF,
    check_out_dir,
    move_into_place,
    partial_dir,
)
from wurst.models.hub.pipeline_dir import (
    STAGE_TARGETS,
    TEXT_ENCODER_TARGET,
    build_network,
    write_json,
    write_network,
)
from wurst.models.semantic_compressor import OFFICIAL_CHECKPOINT_KEY

log = logging.getLogger(__name__)

# stage → (file name, the key of the weights inside it)
OFFICIAL_CHECKPOINTS = {
    "a": ("vqgan_f4_v1_500k.pt", "state_dict"),
    "b": ("model_v2_stage_b.pt", "state_dict"),
    "c": ("model_v3_stage_c.pt", "ema_state_dict"),
}
# nn.MultiheadAttention's stacked projections → diffusers' Attention names (q, k, v in that order).
_IN_PROJ = ("attn.in_proj_weight", "attn.in_proj_bias")
_QKV = ("to_q", "to_k", "to_v")
_OUT_PROJ = {"attn.out_proj.weight": "to_out.0.weight", "attn.out_proj.bias": "to_out.0.bias"}
_CODEBOOK = {"vquantizer.codebook.weight": "vquantizer.embedding.weight"}


def has_official_checkpoints(folder: str | Path) -> bool:
    folder = Path(folder)
    return folder.is_dir() and any((folder / name).is_file() for name, _ in OFFICIAL_CHECKPOINTS.values())


def official_to_ours(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official parameter names → ours (diffusers'): split ``in_proj`` into q/k/v, rename ``out_proj`` and
    Stage A's codebook; every other tensor keeps its name."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        suffix = next((s for s in _IN_PROJ if key.endswith(s)), None)
        if suffix is not None:
            if value.shape[0] % 3:
                raise ValueError(f"{key} has {value.shape[0]} rows; a stacked q/k/v projection has a multiple of 3")
            kind = suffix.rsplit("_", 1)[1]  # weight | bias
            for name, part in zip(_QKV, value.chunk(3, dim=0), strict=True):
                out[key[: -len(suffix)] + f"{name}.{kind}"] = part.contiguous()
            continue
        renamed = next((key[: -len(old)] + new for old, new in {**_OUT_PROJ, **_CODEBOOK}.items() if key.endswith(old)), key)
        out[renamed] = value
    return out


def read_official_checkpoint(path: Path, key: str) -> dict[str, torch.Tensor]:
    """The tensors under ``key`` of an official checkpoint, read without unpickling code."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; put the released {path.name} in {path.parent}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # a truncated zip, or a pickle that needs code: either way not loadable safely
        raise ValueError(
            f"{path} is not a readable tensors-only checkpoint ({type(error).__name__}: {error}); download it again"
        ) from error
    if not isinstance(checkpoint, Mapping) or not isinstance(checkpoint.get(key), Mapping):
        found = sorted(checkpoint) if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
        # a wrong file, not a wrong argument type
        raise ValueError(  # noqa: TRY004
            f"{path} has no {key!r} state dict (found {found}); is it the released {path.name}?"
        )
    return dict(checkpoint[key])


def _network(stage: str, config: Mapping[str, Any], state: Mapping[str, torch.Tensor], source: str) -> torch.nn.Module:
    if config.get("_target_") != STAGE_TARGETS[stage] and stage in STAGE_TARGETS:
        raise ValueError(f"the Stage {stage.upper()} config names {config.get('_target_')!r}, not {STAGE_TARGETS[stage]}")
    return build_network(config, state, source)


def import_official(
    folder: str | Path,
    out: str | Path,
    *,
    configs: Mapping[str, Mapping[str, Any]],
    overwrite: bool = False,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write the released checkpoints in ``folder`` as our pipeline directory ``out``.

    Args:
        configs: constructor configs (with ``_target_``) by part: ``stage_a``, ``stage_b``, ``stage_c``,
            ``compressor``, ``text_encoder_b`` (CLIP-H), ``text_encoder_c`` (CLIP-bigG) — the paper's by
            default (``wurst-export import``). The text encoders must name pretrained weights.
        dtype: of the written weights.
    """
    folder, out = Path(folder), Path(out).absolute()
    check_out_dir(out, overwrite)
    for part in ("text_encoder_b", "text_encoder_c"):
        text = configs[part]
        if text.get("_target_") != TEXT_ENCODER_TARGET or not text.get("pretrained"):
            raise ValueError(
                f"{part}: the released checkpoints hold no text encoder, so its config must name pretrained "
                f"weights (an open_clip tag, or a local open_clip checkpoint offline); got {dict(text)}"
            )
    check_cascade_configs({s: dict(configs[f"stage_{s}"]) for s in "abc"}, compressor=dict(configs["compressor"]),
                          source=f"the configs for {folder}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_dir(out)
    tmp.mkdir()
    try:
        for stage in ("a", "b", "c"):
            name, key = OFFICIAL_CHECKPOINTS[stage]
            path = folder / name
            state = read_official_checkpoint(path, key)
            network = _network(stage, configs[f"stage_{stage}"], official_to_ours(state), f"{path}[{key!r}]")
            export_dir = tmp / f"stage_{stage}" / "export"
            write_network(export_dir, "model", _cast(network.state_dict(), dtype), dict(configs[f"stage_{stage}"]))
            provenance: dict[str, Any] = {
                "stage": stage,
                "phase": "imported",
                "group": "imported",
                "imported_from": {"source": str(path), "key": key, "format": "official checkpoint"},
                "params": sum(p.numel() for p in network.parameters()),
                "steps": None,
                "samples_seen": None,
                "config": {},
            }
            if stage == "b":
                effnet = read_official_checkpoint(path, OFFICIAL_CHECKPOINT_KEY)
                compressor = build_network(configs["compressor"], effnet, f"{path}[{OFFICIAL_CHECKPOINT_KEY!r}]")
                write_network(export_dir, "compressor", _cast(compressor.state_dict(), dtype), dict(configs["compressor"]))
                provenance["compressor"] = {"source": str(path), "key": OFFICIAL_CHECKPOINT_KEY}
            if stage in ("b", "c"):
                text = dict(configs[f"text_encoder_{stage}"])
                write_json(export_dir / "text_encoder_config.json", text)
                provenance["tokenizer"] = {"pad_token_id": text.get("pad_token_id")}
            if stage == "c":
                write_json(export_dir / HAND_OFF_FILE, dict(PIPELINE_HAND_OFF))
            write_json(export_dir / "provenance.json", provenance)
            del network, state
        write_json(
            tmp / "pipeline.json",
            {
                "pipeline": "imported",
                "source": str(folder),
                "format": "official checkpoints",
                "stages": {s: str(out / f"stage_{s}") for s in ("a", "b", "c")},
                "hand_off": dict(PIPELINE_HAND_OFF),
            },
        )
        move_into_place(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("imported the official checkpoints in %s → %s", folder, out)
    return out


def _cast(state: Mapping[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
