"""Reading and writing our pipeline directory (DESIGN.md "Artifacts") without importing ``train``.

A pipeline directory holds ``stage_a/``, ``stage_b/``, ``stage_c/`` (stage run directories) and
``pipeline.json``. Each stage's ``export/`` has ``model.safetensors`` + ``config.json`` (constructor
kwargs and ``_target_``) + ``provenance.json``; Stage B's also ``compressor.safetensors`` +
``compressor_config.json``; Stage B's and C's a text encoder: ``text_encoder_config.json`` and, for
randomly initialised encoders, ``text_encoder.safetensors``. The files are plain safetensors and JSON,
so this reader is small; ``train/export.py`` writes them and reads them the same way.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from wurst.models.diffusion import DiffusionSettings
from wurst.models.semantic_compressor import SemanticCompressor
from wurst.models.stage_a import StageA
from wurst.models.stage_b import StageB
from wurst.models.stage_c import StageC
from wurst.models.text_encoder import LEGACY_PAD_TOKEN_ID, TextEncoder

STAGES = ("a", "b", "c")
# config.json is data: only these classes are ever built from it (never an arbitrary import path).
NETWORK_CLASSES: dict[str, type[nn.Module]] = {
    "wurst.models.stage_a.StageA": StageA,
    "wurst.models.stage_b.StageB": StageB,
    "wurst.models.stage_c.StageC": StageC,
    "wurst.models.semantic_compressor.SemanticCompressor": SemanticCompressor,
    "wurst.models.text_encoder.TextEncoder": TextEncoder,
}
STAGE_TARGETS = {
    "a": "wurst.models.stage_a.StageA", "b": "wurst.models.stage_b.StageB", "c": "wurst.models.stage_c.StageC"
}
TEXT_ENCODER_TARGET = "wurst.models.text_encoder.TextEncoder"
COMPRESSOR_TARGET = "wurst.models.semantic_compressor.SemanticCompressor"
# Exports written before the packages moved under ``wurst.`` name their classes ``models.<module>.<Class>``.
_LEGACY_PREFIX = "models."


def canonical_target(target: Any) -> Any:
    """``_target_`` of a config as this version names it (old exports say ``models.stage_b.StageB``)."""
    if isinstance(target, str) and target.startswith(_LEGACY_PREFIX) and f"wurst.{target}" in NETWORK_CLASSES:
        return f"wurst.{target}"
    return target


def canonical_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """An exported network config as this version reads it: the class under its current name, and the
    settings old exports did not record filled with the values they were trained with (a text encoder
    without ``pad_token_id`` padded with open_clip's 0)."""
    config = dict(config)
    if "_target_" in config:
        config["_target_"] = canonical_target(config["_target_"])
    if config.get("_target_") == TEXT_ENCODER_TARGET:
        config.setdefault("pad_token_id", LEGACY_PAD_TOKEN_ID)
    return config


class MissingStageError(FileNotFoundError):
    """A stage export (or one of its files) the operation needs is missing.

    ``path`` is the file, ``problem`` what is wrong with it ("is missing"), for callers that add the
    command which rebuilds it (``train/export.py``'s ``require_export``)."""

    path: Path | None = None
    problem: str = "is missing"


class BrokenArtifactError(ValueError):
    """An export file is there but unusable: truncated, unparsable, or not the class its consumer needs.

    ``path`` and ``problem`` as for :class:`MissingStageError`."""

    path: Path | None = None
    problem: str = ""


def _problem(error_class: type[Exception], path: Path, problem: str, fix: str = "") -> Exception:
    error = error_class(f"{path} {problem}{fix}")
    error.path, error.problem = path, problem
    return error


def stage_export_dir(pipeline_dir: str | Path, stage: str) -> Path:
    return Path(pipeline_dir) / f"stage_{stage}" / "export"


def weights_file(export_dir: Path, name: str) -> Path:
    return export_dir / ("model.safetensors" if name == "model" else f"{name}.safetensors")


def config_file(export_dir: Path, name: str) -> Path:
    return export_dir / ("config.json" if name == "model" else f"{name}_config.json")


def required_files(stage: str) -> list[tuple[str, str]]:
    """(network name, kind) pairs every export of ``stage`` holds; kind is "weights" or "config"."""
    # Stage B's compressor is not required: an imported public cascade has none (the diffusers layout
    # does not hold it), and the Hub export publishes it only when present.
    files = [("model", "weights"), ("model", "config")]
    if stage in ("b", "c"):
        files += [("text_encoder", "config")]  # weights only for randomly initialised encoders
    return files


# ----- completeness: every file checked before a consumer starts work ----------------------------
def check_safetensors(path: str | Path) -> dict[str, list[int]]:
    """Shapes by tensor name of a complete safetensors file, from its header only (no tensor is read).

    Complete: the 8-byte header length, the JSON header it announces, and every tensor's byte range
    lie inside the file. A write cut short (a kill, a full disk, a partial copy) fails here, naming the
    file, rather than later in safetensors' own "incomplete metadata, file not fully covered"."""
    path = Path(path)
    if not path.is_file():
        raise _problem(MissingStageError, path, "is missing")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _problem(BrokenArtifactError, path, f"is truncated: {size} bytes, not even a safetensors header")
        header_length = int.from_bytes(head, "little")
        if 8 + header_length > size:
            raise _problem(
                BrokenArtifactError, path,
                f"is truncated or not a safetensors file: its header announces {header_length:,} bytes but the "
                f"file holds {size:,}",
            )
        raw = f.read(header_length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _problem(BrokenArtifactError, path, f"is not a safetensors file: its header does not parse ({error})")
    if not isinstance(header, dict):
        raise _problem(BrokenArtifactError, path, "is not a safetensors file: its header is not a JSON object")
    shapes: dict[str, list[int]] = {}
    data_end = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            begin, end = (int(x) for x in info["data_offsets"])
            shapes[key] = [int(n) for n in info["shape"]]
        except (KeyError, TypeError, ValueError) as error:
            raise _problem(BrokenArtifactError, path, f"has a malformed header entry for {key!r} ({error!r})")
        if not 0 <= begin <= end:
            raise _problem(BrokenArtifactError, path, f"has a malformed header entry for {key!r} (offsets {begin}, {end})")
        data_end = max(data_end, end)
    needed = 8 + header_length + data_end
    if size < needed:
        raise _problem(
            BrokenArtifactError, path,
            f"is truncated: {size:,} of the {needed:,} bytes its header declares for {len(shapes)} tensors "
            f"({size / needed:.0%}); the write or copy was cut short",
        )
    return shapes


def check_json(path: str | Path) -> dict[str, Any]:
    """The JSON object in ``path``; missing, unparsable or not an object is an error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise _problem(MissingStageError, path, "is missing")
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _problem(BrokenArtifactError, path, f"is not valid JSON ({error}); it is truncated or was overwritten")
    if not isinstance(data, dict):
        raise _problem(BrokenArtifactError, path, f"must hold a JSON object, not a {type(data).__name__}")
    return data


def check_target(config: Mapping[str, Any], path: Path, expected: str) -> None:
    """The config's ``_target_`` is the class this export file must hold (old ``models.`` names accepted)."""
    target = canonical_target(config.get("_target_"))
    if target not in NETWORK_CLASSES:
        raise _problem(
            BrokenArtifactError, path,
            f"names _target_={target!r}: refusing to build {target!r} from an exported config; only "
            f"{sorted(NETWORK_CLASSES)} are built from exports",
        )
    if target != expected:
        raise _problem(BrokenArtifactError, path, f"has _target_={target!r}, but this file must describe a {expected}")


NETWORK_TARGETS = {"compressor": COMPRESSOR_TARGET, "text_encoder": TEXT_ENCODER_TARGET}


@dataclass
class CheckedExport:
    """What :func:`check_export` read: configs and weight shapes by network name, and the provenance."""

    export_dir: Path
    configs: dict[str, dict[str, Any]]
    shapes: dict[str, dict[str, list[int]]]
    provenance: dict[str, Any]


def check_export(export_dir: str | Path, stage: str, names: Sequence[str] = ("model",)) -> CheckedExport:
    """Checks the files of ``names`` in a stage export before anything reads them for real.

    Each network: ``<name>.safetensors`` complete (:func:`check_safetensors`; a text encoder's only when
    it has one, pretrained encoders carry none), its config JSON parsed and naming the expected class;
    then ``provenance.json`` parsed (written last, it marks the export complete). Raises
    :class:`MissingStageError` or :class:`BrokenArtifactError` for the first bad file, with ``path`` and
    ``problem`` set."""
    export_dir = Path(export_dir)
    configs, shapes = {}, {}
    for name in names:
        weights, config_path = weights_file(export_dir, name), config_file(export_dir, name)
        optional = name == "text_encoder" and not weights.is_file() and config_path.is_file()
        if not optional:
            shapes[name] = check_safetensors(weights)
        config = check_json(config_path)
        check_target(config, config_path, STAGE_TARGETS[stage] if name == "model" else NETWORK_TARGETS[name])
        if optional and not config.get("pretrained"):
            raise _problem(
                MissingStageError, weights,
                f"is missing, and {config_path.name} describes a randomly initialised text encoder "
                "(pretrained: null), whose weights must travel with the export",
            )
        configs[name] = config
    provenance = check_json(export_dir / "provenance.json")
    return CheckedExport(export_dir, configs, shapes, provenance)


def check_pipeline_dir(pipeline_dir: str | Path, stages: tuple[str, ...] = STAGES) -> dict[str, Path]:
    """Every file the Hub export reads, checked before anything is written: stage → its export directory.

    Raises :class:`MissingStageError` naming the first missing file and the command that makes it.
    """
    pipeline_dir = Path(pipeline_dir)
    if not pipeline_dir.is_dir():
        raise MissingStageError(
            f"pipeline directory {pipeline_dir} does not exist; pass the directory `wurst-train` wrote "
            "(e.g. outputs/tiny, which holds stage_a/, stage_b/, stage_c/)"
        )
    found = {}
    for stage in stages:
        export_dir = stage_export_dir(pipeline_dir, stage)
        names = [n for n, kind in required_files(stage) if kind == "config"]
        try:
            check_export(export_dir, stage, names)
        except (MissingStageError, BrokenArtifactError) as error:
            raise type(error)(
                f"the Hub export needs all three stages, but Stage {stage.upper()}'s export file {error.path} "
                f"{error.problem}; train the stage first (`wurst-train stage={stage}`, e.g. `wurst-train "
                f"stage={stage} experiment=tiny`, or the pipeline: `wurst-train pipeline=tiny`)"
            ) from error
        found[stage] = export_dir
    return found


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); re-export the stage") from error
    if not isinstance(data, dict):
        raise TypeError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def read_config(export_dir: str | Path, name: str = "model") -> dict[str, Any]:
    return read_json(config_file(Path(export_dir), name))


def read_provenance(export_dir: str | Path) -> dict[str, Any]:
    return read_json(Path(export_dir) / "provenance.json")


def trained_diffusion_settings(provenance: Mapping[str, Any], source: str = "provenance") -> DiffusionSettings:
    """The diffusion settings (schedule s, clamp, training t, p2) a stage export was trained with, from its
    provenance's resolved config; an export that records none (an import) used REFERENCE.md's."""
    config = provenance.get("config") or {}
    try:
        return DiffusionSettings.from_config(config.get("diffusion"))
    except (TypeError, ValueError) as error:
        raise ValueError(f"{source}: config.diffusion cannot be read ({error})") from error


def read_state_dict(export_dir: str | Path, name: str = "model") -> dict[str, torch.Tensor]:
    return load_file(str(weights_file(Path(export_dir), name)))


def count_parameters(weights: str | Path) -> int:
    """Number of values in a safetensors file, from its header only."""
    total = 0
    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 - a safe_open handle is not iterable
            count = 1
            for size in f.get_slice(key).get_shape():
                count *= size
            total += count
    return total


def network_class(config: Mapping[str, Any], source: str) -> type[nn.Module]:
    target = canonical_target(config.get("_target_"))
    if target not in NETWORK_CLASSES:
        raise ValueError(
            f"{source}: refusing to build _target_={target!r}; only {sorted(NETWORK_CLASSES)} are built from exports"
        )
    return NETWORK_CLASSES[target]


def build_from_config(config: Mapping[str, Any], device: str | torch.device | None = None,
                      source: str = "an exported config") -> nn.Module:
    """A network of an allowed class from its exported config, with fresh weights (``device="meta"``: none)."""
    config = canonical_config(config)
    cls = network_class(config, source)
    kwargs = {k: v for k, v in config.items() if k != "_target_"}
    if device is None:
        return cls(**kwargs)
    with torch.device(device):
        return cls(**kwargs)


def build_network(
    config: Mapping[str, Any], state: Mapping[str, torch.Tensor] | None, source: str
) -> nn.Module:
    """Build the allowed class of ``config`` and load ``state`` (strictly: every key, every shape)."""
    config = canonical_config(config)
    if state is None:
        return build_from_config(config, source=source)
    cls = network_class(config, source)
    kwargs = {k: v for k, v in config.items() if k != "_target_"}
    if "pretrained" in kwargs:  # the weights come with the export: never download an initialisation
        kwargs["pretrained"] = False if isinstance(kwargs["pretrained"], bool) else None
    # Stages and text towers are built on the meta device (no wasted random init at paper size); their
    # only non-persistent buffer, the text tower's causal mask, is rebuilt below. Other classes (timm
    # backbones keep buffers of their own) are built normally.
    on_meta = cls in (StageA, StageB, StageC, TextEncoder)
    with torch.device("meta" if on_meta else "cpu"):
        module = cls(**kwargs)
    try:
        module.load_state_dict(dict(state), strict=True, assign=on_meta)
    except RuntimeError as error:
        raise ValueError(f"{source}: the weights do not fit the config's {cls.__name__}: {error}") from error
    if isinstance(module, TextEncoder):
        module.text.attn_mask = module.text.build_causal_mask()
    leftovers = [name for name, buffer in module.named_buffers() if buffer.is_meta]
    if leftovers:
        raise RuntimeError(
            f"{source}: buffers {leftovers[:5]} of {cls.__name__} were not restored after loading"
        )
    return module.eval()


def read_network(export_dir: str | Path, name: str = "model") -> nn.Module:
    """The network ``name`` of an export (``model``, ``compressor``), built from its config and weights."""
    export_dir = Path(export_dir)
    return build_network(
        read_config(export_dir, name), read_state_dict(export_dir, name), str(export_dir / name)
    )


def read_text_encoder(export_dir: str | Path) -> TextEncoder:
    """The text encoder a stage trained with: its saved weights, or the pretrained name/path in its config
    (open_clip then downloads a tag, or reads a local checkpoint)."""
    export_dir = Path(export_dir)
    config = canonical_config(read_config(export_dir, "text_encoder"))
    if config.get("_target_") != TEXT_ENCODER_TARGET:
        raise ValueError(f"{config_file(export_dir, 'text_encoder')}: _target_ must be {TEXT_ENCODER_TARGET}")
    weights = weights_file(export_dir, "text_encoder")
    state = load_file(str(weights)) if weights.is_file() else None
    if state is None and not config.get("pretrained"):
        raise MissingStageError(
            f"{export_dir} has a randomly initialised text encoder config but no {weights.name}; re-export the stage"
        )
    return build_network(config, state, str(export_dir / "text_encoder"))


# ----- writing -----------------------------------------------------------------------------------
def _atomic_replace(tmp: Path, path: Path) -> None:
    """Flush ``tmp`` to the disk, then rename it over ``path``: a crash leaves the old file or the new
    one, never a name pointing at bytes still in the page cache."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    _atomic_replace(tmp, path)


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def write_safetensors(
    path: Path, state: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    """Contiguous CPU tensors, written then renamed. safetensors refuses tensors that share storage, so a
    tensor whose storage was already seen is copied (no copy otherwise: paper-size stages are GBs)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors, seen = {}, set()
    for key, value in state.items():
        tensor = value.detach().to("cpu").contiguous()
        pointer = tensor.untyped_storage().data_ptr()
        if pointer in seen:
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        tensors[key] = tensor
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(tensors, str(tmp), metadata={"format": "pt", **(metadata or {})})
    _atomic_replace(tmp, path)


def write_network(
    export_dir: str | Path, name: str, state: Mapping[str, torch.Tensor], config: Mapping[str, Any]
) -> Path:
    """``<name>.safetensors`` + its config (``config.json`` for ``model``): the one writer of export files."""
    if canonical_target(config.get("_target_")) not in NETWORK_CLASSES:
        raise ValueError(f"config for export {name!r} needs a '_target_' among {sorted(NETWORK_CLASSES)}")
    export_dir = Path(export_dir)
    weights = weights_file(export_dir, name)
    write_safetensors(weights, state)
    write_json(config_file(export_dir, name), dict(config))
    return weights
