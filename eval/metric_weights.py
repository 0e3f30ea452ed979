"""Every metric model's weights found before any image is generated: a local path, the local cache, or
a download made now (when downloads are allowed), never a surprise after hours of generation.

A COCO-30K run generates 30,000 images before it scores them; a metric whose weights cannot be had
(a compute node without network, a typo in a path) would otherwise fail only then. So
:func:`resolve_metric_weights` runs first, on every rank, and replaces each enabled metric's setting
with a local file or folder, which the metric modules then load without the network:

| metric | setting | environment variable | what is resolved |
|---|---|---|---|
| FID, IS | ``metrics.fid.weights`` (IS: ``metrics.inception_score.weights``) | ``WURST_INCEPTION_WEIGHTS`` | torch-fidelity's Inception file: the path, else torch.hub's cache, else a download |
| CLIP score | ``metrics.clip_score.model`` (+ ``processor``, ``pretrained``) | ``WURST_CLIP_SCORE_MODEL`` | a Hub folder (config, weights, processor files) or open_clip weights |
| PickScore | ``metrics.pickscore.model``, ``metrics.pickscore.processor`` | ``WURST_PICKSCORE_MODEL``, ``WURST_PICKSCORE_PROCESSOR`` | two Hub folders |

Downloads go through the libraries' own caches (``TORCH_HOME``, ``HF_HOME``), so nothing is fetched
twice. ``HF_HUB_OFFLINE=1`` (how compute nodes are usually configured) means no download is tried,
Inception's included. Every metric that cannot be resolved is listed in one error, with the key and the
environment variable that fix it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from wurst.eval.clip_score import looks_like_path
from wurst.eval.inception import INCEPTION_WEIGHTS_FILE, resolve_inception_weights

log = logging.getLogger(__name__)

INCEPTION_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
HUB_MODEL_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")
HUB_TEXT_FILES = ["*.json", "*.txt"]  # configs, processor and tokenizer files (small)


class MetricWeightsError(FileNotFoundError):
    """One or more enabled metrics have no weights they can load; raised before generation."""


@dataclass
class Setting:
    """Where a weight setting lives, to name it in errors."""

    what: str  # "Inception (FID, IS)"
    key: str  # "metrics.fid.weights"
    env: str | None  # "WURST_INCEPTION_WEIGHTS"

    def fix(self, value: str = "DIR") -> str:
        env = f" (or the environment variable {self.env}={value})" if self.env else ""
        return f"set {self.key}={value}{env}"


class Unresolved(Exception):
    """One setting that could not be resolved (collected into :class:`MetricWeightsError`)."""


def downloads_allowed() -> bool:
    """False when the Hugging Face offline switch is on: then no metric download is tried at all."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() not in ("1", "true", "yes", "on")


# ----- Inception (FID, IS) -------------------------------------------------------------------------
def inception_weights_file(weights: str | Path | None, setting: Setting) -> str:
    """A local Inception weights file: ``weights`` itself, torch.hub's cached copy, or a download now."""
    if weights is not None:
        try:
            return str(resolve_inception_weights(weights))
        except FileNotFoundError as error:
            raise Unresolved(f"{setting.what}: {error}; {setting.fix('<file or folder>')}") from error
    import torch.hub

    cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE
    if cached.is_file():
        return str(cached)
    advice = (
        f"download {INCEPTION_URL} once (on a machine with network) and {setting.fix('<that file or its folder>')}, "
        f"or put it in torch.hub's cache {cached}"
    )
    if not downloads_allowed():
        raise Unresolved(
            f"{setting.what}: not in torch.hub's cache ({cached}) and HF_HUB_OFFLINE=1 forbids "
            f"downloads; {advice}"
        )
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(INCEPTION_URL, str(cached), progress=False)
    except Exception as error:  # URLError, timeouts, HTTP errors: all mean "no weights"
        cached.unlink(missing_ok=True)
        raise Unresolved(
            f"{setting.what}: the download failed ({type(error).__name__}: {error}); {advice}"
        ) from error
    return str(cached)


# ----- Hugging Face Hub folders (transformers CLIP, PickScore) ---------------------------------------
def hub_folder(name: str, setting: Setting, kind: str = "model") -> str:
    """A local folder holding a transformers model (``kind="model"``: config + weights + any processor
    files) or just its processor files (``kind="processor"``): ``name`` itself when it is a path, else
    the Hub cache's snapshot of ``name``, downloaded now when it is not cached and downloads are allowed."""
    if looks_like_path(name):
        folder = Path(name).expanduser()
        if not folder.is_dir():
            raise Unresolved(f"{setting.what}: the folder {folder} does not exist; {setting.fix()}")
        missing = missing_files(folder, kind)
        if missing:
            raise Unresolved(f"{setting.what}: the folder {folder} lacks {missing}; {setting.fix()}")
        return str(folder)
    from huggingface_hub import snapshot_download

    only = (
        " --include '*.json' '*.txt'" if kind == "processor" else ""
    )  # the processor files, not 4 GB of weights
    advice = f"download it once (`hf download {name}{only} --local-dir DIR` on a machine with network) and {setting.fix()}"
    offline = not downloads_allowed()
    patterns = HUB_TEXT_FILES if kind == "processor" else [*HUB_TEXT_FILES, HUB_MODEL_WEIGHTS[0]]
    try:
        folder = Path(snapshot_download(name, allow_patterns=patterns))
        if kind == "model" and offline is False and missing_files(folder, kind):
            folder = Path(snapshot_download(name, allow_patterns=[*HUB_TEXT_FILES, HUB_MODEL_WEIGHTS[1]]))
    except Exception as error:  # offline, unknown repo, network: all mean "not available"
        why = (
            "not in the Hub cache and HF_HUB_OFFLINE=1 forbids downloads"
            if offline
            else (
                f"the download failed ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"
            )
        )
        raise Unresolved(f"{setting.what} {name!r}: {why}; {advice}") from error
    missing = missing_files(folder, kind)
    if missing:
        raise Unresolved(f"{setting.what} {name!r}: the cached copy {folder} lacks {missing}; {advice}")
    return str(folder)


def missing_files(folder: Path, kind: str) -> list[str]:
    if (
        kind == "processor"
    ):  # transformers ≥ 5 writes processor_config.json, older ones preprocessor_config.json
        found = any((folder / name).is_file() for name in PROCESSOR_FILES)
        return [] if found else [" or ".join(PROCESSOR_FILES)]
    missing = [] if (folder / "config.json").is_file() else ["config.json"]
    if not any((folder / name).is_file() for name in HUB_MODEL_WEIGHTS):
        missing.append(" or ".join(HUB_MODEL_WEIGHTS))
    return missing


# ----- open_clip (CLIP score's other backend) ------------------------------------------------------
def open_clip_weights(model: str, pretrained: str | None, setting: Setting) -> str | None:
    """``pretrained`` as a local file: the file itself, or open_clip's cached/downloaded tag weights."""
    if not model.startswith(("local-dir:", "hf-hub:")) and looks_like_path(model):
        folder = Path(model).expanduser()
        if not (folder / "open_clip_config.json").is_file():
            raise Unresolved(
                f"{setting.what}: the open_clip folder {folder} lacks open_clip_config.json; {setting.fix()}"
            )
        return pretrained
    if pretrained is None or model.startswith(("local-dir:", "hf-hub:")):
        return pretrained
    if looks_like_path(pretrained):
        if not Path(pretrained).expanduser().is_file():
            raise Unresolved(
                f"{setting.what}: the open_clip weights file {pretrained} does not exist; "
                "set metrics.clip_score.pretrained=<weights file>"
            )
        return pretrained
    import open_clip

    config = open_clip.get_pretrained_cfg(model, pretrained)
    if not config:
        raise Unresolved(f"{setting.what}: open_clip knows no pretrained tag {pretrained!r} for {model!r}")
    try:
        return open_clip.download_pretrained(config)
    except Exception as error:
        raise Unresolved(
            f"{setting.what} {model!r} pretrained={pretrained!r}: not cached and not downloadable ({error}); "
            "download the weights once and set metrics.clip_score.pretrained=<weights file>"
        ) from error


# ----- all of them ---------------------------------------------------------------------------------
def resolve_metric_weights(cfg: DictConfig) -> dict[str, Any]:
    """Resolves every enabled metric's weights and writes the local paths back into ``cfg.metrics``.

    Returns ``{setting key: local path}``; raises :class:`MetricWeightsError` listing every setting that
    could not be resolved, with its key and environment variable."""
    m = cfg.metrics
    resolved: dict[str, Any] = {}
    problems: list[str] = []

    def attempt(key: str, resolve) -> None:
        try:
            resolved[key] = resolve()
        except Unresolved as problem:
            problems.append(str(problem))

    inception = Setting("Inception (FID, IS)", "metrics.fid.weights", "WURST_INCEPTION_WEIGHTS")
    if m.fid.enabled:
        attempt("metrics.fid.weights", lambda: inception_weights_file(m.fid.weights, inception))
    if m.inception_score.enabled:
        follows_fid = m.inception_score.weights == m.fid.weights  # the default: one Inception file for both
        if follows_fid and m.fid.enabled:
            if "metrics.fid.weights" in resolved:  # (a failure is already listed once)
                resolved["metrics.inception_score.weights"] = resolved["metrics.fid.weights"]
        else:
            setting = (
                inception
                if follows_fid
                else Setting("Inception (IS)", "metrics.inception_score.weights", None)
            )
            attempt(
                "metrics.inception_score.weights",
                lambda: inception_weights_file(m.inception_score.weights, setting),
            )
    if m.clip_score.enabled:
        c = m.clip_score
        clip = Setting("CLIP score model", "metrics.clip_score.model", "WURST_CLIP_SCORE_MODEL")
        if c.backend == "transformers":
            attempt("metrics.clip_score.model", lambda: hub_folder(c.model, clip))
            if c.processor is not None:
                processor = Setting("CLIP score processor", "metrics.clip_score.processor", None)
                attempt(
                    "metrics.clip_score.processor", lambda: hub_folder(c.processor, processor, "processor")
                )
            elif "metrics.clip_score.model" in resolved and missing_files(
                Path(resolved["metrics.clip_score.model"]), "processor"
            ):
                problems.append(
                    f"CLIP score model {c.model!r}: {resolved['metrics.clip_score.model']} has no processor files "
                    "(processor_config.json); set metrics.clip_score.processor=<name or folder>"
                )
        else:
            attempt("metrics.clip_score.pretrained", lambda: open_clip_weights(c.model, c.pretrained, clip))
    if m.pickscore.enabled:
        p = m.pickscore
        model = Setting("PickScore model", "metrics.pickscore.model", "WURST_PICKSCORE_MODEL")
        processor = Setting("PickScore processor", "metrics.pickscore.processor", "WURST_PICKSCORE_PROCESSOR")
        attempt("metrics.pickscore.model", lambda: hub_folder(p.model, model))
        attempt("metrics.pickscore.processor", lambda: hub_folder(p.processor, processor, "processor"))
    if problems:
        raise MetricWeightsError(
            f"wurst-eval cannot load the weights of {len(problems)} metric setting(s); nothing has been "
            "generated or scored yet:\n  - "
            + "\n  - ".join(problems)
            + "\nOr turn a metric off with metrics.<fid|inception_score|clip_score|pickscore>.enabled=false."
        )
    for key, value in resolved.items():
        if value is not None:
            _set(cfg, key, value)
    if resolved:
        log.info("metric weights: %s", ", ".join(f"{k}={v}" for k, v in resolved.items()))
    return resolved


def _set(cfg: DictConfig, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = cfg
    for part in parents:
        node = node[part]
    node[leaf] = value


def check_references(cfg: DictConfig) -> None:
    """FID's reference folder, checked before generation as the weights are."""
    if not cfg.metrics.fid.enabled:
        return
    if not cfg.references:
        raise ValueError(
            "FID needs reference images: pass references=<folder> "
            "(`wurst-data coco30k` writes <out>/references) "
            "or metrics.fid.enabled=false"
        )
    if not Path(cfg.references).is_dir():
        raise FileNotFoundError(f"references={cfg.references} is not a folder of reference images")
