"""Build the C → B → A cascade sampler from a pipeline directory's exports."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from torch import nn

from wurst.models.cascade import CascadeSampler
from wurst.models.hub.pipeline_dir import read_provenance, read_text_encoder, trained_diffusion_settings
from wurst.train.config import CONFIG_DIR
from wurst.train.export import load_network, require_export


def load_text_encoder(export_dir: Path) -> nn.Module:
    """The text encoder a stage trained with (``models/hub/pipeline_dir.py`` ``read_text_encoder``)."""
    return read_text_encoder(export_dir)


def sampler_config(name_or_path: str = "paper") -> dict[str, Any]:
    """A ``conf/sampler/<name>.yaml`` (or a yaml path) as a plain dict without Hydra keys."""
    path = Path(name_or_path)
    if not path.is_file():
        path = Path(CONFIG_DIR) / "sampler" / f"{name_or_path}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (Path(CONFIG_DIR) / "sampler").glob("*.yaml"))
        raise FileNotFoundError(f"sampler config {name_or_path!r} not found; use one of {known} or a yaml path")
    cfg = OmegaConf.load(path)
    merged = OmegaConf.create()
    for parent in cfg.get("defaults", []):
        if parent != "_self_":
            merged = OmegaConf.merge(merged, OmegaConf.create(sampler_config(str(parent))))
    cfg = OmegaConf.merge(merged, {k: v for k, v in cfg.items() if k != "defaults"})
    return {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if not k.startswith("_")}


def load_cascade(
    pipeline_dir: str | Path,
    sampler: str | dict[str, Any] = "paper",
    stage_c: nn.Module | None = None,
    text_encoder_c: nn.Module | None = None,
    hand_off: dict[str, float] | None = None,
    device: str = "cpu",
    **overrides: Any,
) -> CascadeSampler:
    """Stage A from stage_a/export, Stage B + its text encoder from stage_b/export, Stage C + its text
    encoder from stage_c/export (or the given ``stage_c``, for previews during Stage C training)."""
    pipeline_dir = Path(pipeline_dir)
    # Every export file is checked (complete, the expected classes) before the first one is loaded.
    a_dir = require_export(pipeline_dir / "stage_a" / "export", "a", why="the cascade decodes with Stage A")
    b_dir = require_export(pipeline_dir / "stage_b" / "export", "b", names=("model", "text_encoder"),
                           why="the cascade decodes with Stage B")
    settings = sampler_config(sampler) if isinstance(sampler, str) else dict(sampler)
    settings.update(overrides)
    stage_c_dir = None
    if stage_c is None:
        c_dir = stage_c_dir = require_export(pipeline_dir / "stage_c" / "export", "c", names=("model", "text_encoder"),
                               why="the cascade starts from Stage C")
        stage_c = load_network(c_dir).to(device)
        text_encoder_c = load_text_encoder(c_dir).to(device)
        hand_off_file = c_dir / "hand_off.json"
        if hand_off_file.is_file():  # a Stage C trained on its own compressor statistics
            settings.update(json.loads(hand_off_file.read_text()))
    elif text_encoder_c is None:
        raise ValueError("load_cascade: pass text_encoder_c together with stage_c")
    if hand_off:
        settings.update(hand_off)
    # Each stage samples on the schedule it was trained with (its export's diffusion.schedule.s).
    settings.setdefault("decoder_schedule_s", trained_diffusion_settings(read_provenance(b_dir), str(b_dir)).s)
    if stage_c_dir is not None:
        settings.setdefault("prior_schedule_s", trained_diffusion_settings(read_provenance(stage_c_dir), str(stage_c_dir)).s)
    return CascadeSampler(
        stage_c=stage_c,
        stage_b=load_network(b_dir).to(device),
        stage_a=load_network(a_dir).to(device),
        text_encoder_c=text_encoder_c,
        text_encoder_b=load_text_encoder(b_dir).to(device),
        **settings,
    )
