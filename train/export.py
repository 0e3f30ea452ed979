"""A stage's ``export/`` folder: what later stages and users consume (DESIGN.md, artifacts).

``<name>.safetensors`` (EMA weights where EMA is on), ``<name>_config.json`` (the network's
constructor kwargs and ``_target_``; ``config.json`` for the main network) and ``provenance.json``.
Every file is written to a temporary name and renamed into place, so a kill mid-export never leaves a
half-written file under a final name; ``provenance.json`` goes last and marks the export complete.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from wurst.models.hub.pipeline_dir import NETWORK_CLASSES, canonical_target

# config.json is data: only the classes pipeline_dir names may be built from it (never an arbitrary import path).
ALLOWED_TARGETS = frozenset(NETWORK_CLASSES)

STAGE_COMMANDS = {
    "a": "wurst-train stage=a experiment=tiny",
    "b": "wurst-train stage=b experiment=tiny",
    "c": "wurst-train stage=c experiment=tiny",
}


class MissingExportError(FileNotFoundError):
    """A stage's input artifact is missing or incomplete."""


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_write_json(path: Path, obj: Any) -> None:
    _atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def _file_name(name: str, kind: str) -> str:
    if name == "model":
        return "model.safetensors" if kind == "weights" else "config.json"
    return f"{name}.safetensors" if kind == "weights" else f"{name}_config.json"


def write_network(export_dir: str | Path, name: str, module: nn.Module, config: Mapping[str, Any]) -> Path:
    """Writes ``module``'s state dict (contiguous CPU tensors) and its constructor config."""
    if "_target_" not in config:
        raise ValueError(f"config for export {name!r} needs a '_target_' naming the network class")
    export_dir = Path(export_dir)
    export_dir.mkdir(parents=True, exist_ok=True)
    weights = export_dir / _file_name(name, "weights")
    state = {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}
    tmp = weights.with_name(f".{weights.name}.tmp-{os.getpid()}")
    save_file(state, str(tmp))
    os.replace(tmp, weights)
    _atomic_write_json(export_dir / _file_name(name, "config"), dict(config))
    return weights


def write_provenance(export_dir: str | Path, provenance: Mapping[str, Any]) -> Path:
    path = Path(export_dir) / "provenance.json"
    _atomic_write_json(path, dict(provenance))
    return path


def require_export(export_dir: str | Path, stage: str, name: str = "model", why: str = "") -> Path:
    """Raises :class:`MissingExportError` naming the missing file and the command that makes it."""
    export_dir = Path(export_dir)
    for path in (export_dir / _file_name(name, "weights"), export_dir / _file_name(name, "config"),
                 export_dir / "provenance.json"):
        if not path.is_file():
            command = STAGE_COMMANDS.get(stage, f"wurst-train stage={stage}")
            reason = f" ({why})" if why else ""
            raise MissingExportError(
                f"needs a Stage {stage.upper()} export at {path}{reason}; it is missing. "
                f"Produce it with `{command}` (or point the config at an existing export)."
            )
    return export_dir


def read_config(export_dir: str | Path, name: str = "model") -> dict[str, Any]:
    return json.loads((Path(export_dir) / _file_name(name, "config")).read_text())


def build_from_config(config: Mapping[str, Any], device: str | torch.device | None = None) -> nn.Module:
    """Instantiates an allowed network class from an exported config (no arbitrary imports)."""
    config = dict(config)
    target = canonical_target(config.pop("_target_", None))
    if target not in ALLOWED_TARGETS:
        raise ValueError(
            f"refusing to build {target!r} from an exported config: only {sorted(ALLOWED_TARGETS)} are allowed"
        )
    cls = NETWORK_CLASSES[target]
    if device is not None:
        with torch.device(device):
            return cls(**config)
    return cls(**config)


def load_network(export_dir: str | Path, name: str = "model", strict: bool = True) -> nn.Module:
    """Builds the network from ``<name>`` config and loads its safetensors weights (CPU)."""
    export_dir = Path(export_dir)
    config = read_config(export_dir, name)
    if "pretrained" in config:  # the weights come from the export: never download the initialisation
        config["pretrained"] = False if isinstance(config["pretrained"], bool) else None
    module = build_from_config(config)
    state = load_file(str(export_dir / _file_name(name, "weights")))
    module.load_state_dict(state, strict=strict)
    return module


def read_provenance(export_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(export_dir) / "provenance.json").read_text())


def git_revision() -> str | None:
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "rev-parse", "HEAD"], check=False, cwd=here, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None

