"""A stage's ``export/`` folder: what later stages and users consume (DESIGN.md, artifacts).

``<name>.safetensors`` (EMA weights where EMA is on), ``<name>_config.json`` (the network's
constructor kwargs and ``_target_``; ``config.json`` for the main network) and ``provenance.json``.
Every file is written to a temporary name and renamed into place, so a kill mid-export never leaves a
half-written file under a final name; ``provenance.json`` goes last and marks the export complete.
"""

from __future__ import annotations

import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from wurst.models.hub import pipeline_dir
from wurst.models.hub.pipeline_dir import (  # noqa: F401 - the readers stages use, from their one owner
    NETWORK_CLASSES,
    BrokenArtifactError,
    MissingStageError,
    build_from_config,
    check_export,
    read_config,
    read_provenance,
)

# config.json is data: only the classes pipeline_dir names may be built from it (never an arbitrary import path).
ALLOWED_TARGETS = frozenset(NETWORK_CLASSES)

STAGE_COMMANDS = {
    "a": "wurst-train stage=a experiment=tiny",
    "b": "wurst-train stage=b experiment=tiny",
    "c": "wurst-train stage=c experiment=tiny",
}


class MissingExportError(MissingStageError):
    """A stage's input artifact is missing or incomplete (a ``FileNotFoundError``)."""


class BrokenExportError(BrokenArtifactError):
    """A stage's input artifact is there but truncated, unparsable or incompatible (a ``ValueError``)."""


def _experiment_keys(name: str, seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """``group``, ``phase`` and the stage an experiment file sets, following its experiment parents."""
    from omegaconf import OmegaConf

    from wurst.train.config import CONFIG_DIR

    path = Path(CONFIG_DIR) / "experiment" / f"{name}.yaml"
    if name in seen or not path.is_file():
        return {}
    node = OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}
    keys: dict[str, Any] = {}
    for item in node.get("defaults") or []:
        if isinstance(item, str) and item != "_self_":
            keys.update(_experiment_keys(item, (*seen, name)))
        elif isinstance(item, dict) and item.get("override /stage"):
            keys["stage"] = item["override /stage"]
    keys.update({k: node[k] for k in ("group", "phase") if isinstance(node.get(k), str)})
    return keys


def export_command(export_dir: str | Path, stage: str, group: str | None = None, extra: Sequence[str] = ()) -> str:
    """The ``wurst-train`` command that writes ``export_dir`` (``<pipeline_dir>/<phase>/export``).

    The experiment of the run's group whose phase is that run directory's name (``paper_v2``'s
    ``stage_b`` → ``experiment=paper_v2/stage_b_1024``); the tiny experiment for the tiny group;
    otherwise the stage and group (the tiny stage's command when no group is known). ``extra``: overrides that place the output (``paths.output_dir=…``)."""
    from wurst.train.config import CONFIG_DIR

    export_dir = Path(export_dir)
    phase = export_dir.parent.name
    default = STAGE_COMMANDS.get(stage, f"wurst-train stage={stage}") if group is None else None
    group = group or export_dir.parent.parent.name
    command = None
    for path in sorted((Path(CONFIG_DIR) / "experiment").rglob("*.yaml")):
        name = path.relative_to(Path(CONFIG_DIR) / "experiment").with_suffix("").as_posix()
        keys = _experiment_keys(name)
        own_stage = keys.get("stage")
        if keys.get("group") != group or own_stage not in (None, stage):
            continue
        if keys.get("phase", f"stage_{stage}") == phase:
            command = f"wurst-train experiment={name}" if own_stage else f"wurst-train stage={stage} experiment={name}"
            break
    if command is None and default is not None:  # no run to fit: the tiny stage, as a starting point
        command = default
    if command is None:
        command = f"wurst-train stage={stage} group={group}" + ("" if phase == f"stage_{stage}" else f" phase={phase}")
    return " ".join([command, *extra])


def write_network(export_dir: str | Path, name: str, module: nn.Module, config: Mapping[str, Any]) -> Path:
    """Writes ``module``'s state dict and its constructor config (``models/hub/pipeline_dir.py`` lays them out)."""
    return pipeline_dir.write_network(export_dir, name, module.state_dict(), config)


def write_provenance(export_dir: str | Path, provenance: Mapping[str, Any]) -> Path:
    path = Path(export_dir) / "provenance.json"
    pipeline_dir.write_json(path, dict(provenance))
    return path


def require_export(
    export_dir: str | Path,
    stage: str,
    name: str = "model",
    why: str = "",
    names: Sequence[str] | None = None,
    group: str | None = None,
    extra: Sequence[str] = (),
) -> Path:
    """Checks an export before a stage reads it (``models.hub.pipeline_dir.check_export``: present,
    complete, the expected classes). Raises :class:`MissingExportError` or :class:`BrokenExportError`
    naming the file, what is wrong and the command that rebuilds it (:func:`export_command`)."""
    export_dir = Path(export_dir)
    try:
        check_export(export_dir, stage, tuple(names) if names is not None else (name,))
        return export_dir
    except (MissingStageError, BrokenArtifactError) as error:
        command = export_command(export_dir, stage, group, extra)
        reason = f" ({why})" if why else ""
        if isinstance(error, MissingStageError):
            raise MissingExportError(
                f"needs a Stage {stage.upper()} export at {error.path}{reason}; it {error.problem}. "
                f"Produce it with `{command}` (or point the config at an existing export)."
            ) from error
        raise BrokenExportError(
            f"needs a Stage {stage.upper()} export at {error.path}{reason}, but the file {error.problem}. "
            f"Rebuild it with `{command}` (or point the config at an intact export)."
        ) from error


def load_network(export_dir: str | Path, name: str = "model") -> nn.Module:
    """The network ``name`` of an export, built from its config and loaded strictly (CPU, eval mode)."""
    return pipeline_dir.read_network(export_dir, name)


def git_revision() -> str | None:
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "rev-parse", "HEAD"], check=False, cwd=here, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None

