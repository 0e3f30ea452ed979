"""A diffusers-layout Würstchen folder (local or on the Hub) → our networks and a pipeline directory.

Two layouts are read (models/hub/layout.py): a ``WuerstchenCombinedPipeline`` folder (what
``wurst-export`` writes, or diffusers' ``save_pretrained`` of a combined pipeline), and the public v2
pair — a ``WuerstchenDecoderPipeline`` folder whose model card names its prior (``prior:
warp-ai/wuerstchen-prior``) plus that ``WuerstchenPriorPipeline`` folder. Hub ids are fetched with
``huggingface_hub.snapshot_download`` (only the files the import reads).

The written pipeline directory is the one ``wurst-train`` makes: ``stage_{a,b,c}/export`` with
``model.safetensors`` + ``config.json`` + ``provenance.json``, the text encoders as our open_clip
``TextEncoder`` weights, Stage B's compressor when the folder has ``semantic_compressor/`` (the public
folders do not: Stage C training then needs a compressor from elsewhere), and ``pipeline.json``. So
``wurst-train init_from.path=<out>/stage_c/export`` fine-tunes from it and ``wurst-eval pipeline=<out>``
scores it. Folders written by ``wurst-export`` carry ``wurst.json``; its steps, samples and carbon
ledger go back into the provenance.
"""

from __future__ import annotations

import inspect
import logging
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers.pipelines.deprecated.wuerstchen import PaellaVQModel, WuerstchenDiffNeXt, WuerstchenPrior
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from wurst.models.cascade import check_cascade_configs
from wurst.models.diffusers_compat import from_diffusers
from wurst.models.diffusion import COSINE_S
from wurst.models.hub.clip_text_model import (
    TEXT_PROJECTION_FILE,
    transformers_to_open_clip,
)
from wurst.models.hub.diffusers_export import (
    HAND_OFF_FILE,
    PIPELINE_HAND_OFF,
    absorb_hand_off,
    check_out_dir,
    move_into_place,
    partial_dir,
)
from wurst.models.hub.layout import (
    COMBINED_FOLDERS,
    COMBINED_PIPELINE,
    COMPRESSOR_FOLDER,
    DECODER_FOLDERS,
    DECODER_PIPELINE,
    DIFFUSERS_CONFIG,
    PRIOR_FOLDERS,
    PRIOR_PIPELINE,
    SCHEDULER_CONFIG,
    SUMMARY_FILE,
    TRANSFORMERS_WEIGHTS,
)
from wurst.models.hub.pipeline_dir import (
    COMPRESSOR_TARGET,
    STAGE_TARGETS,
    TEXT_ENCODER_TARGET,
    read_json,
    write_json,
    write_network,
)
from wurst.models.stage_a import StageA
from wurst.models.stage_b import StageB
from wurst.models.stage_c import StageC
from wurst.models.text_encoder import TextEncoder

log = logging.getLogger(__name__)

DIFFUSERS_CLASSES = {"a": PaellaVQModel, "b": WuerstchenDiffNeXt, "c": WuerstchenPrior}
OUR_CLASSES = {"a": StageA, "b": StageB, "c": StageC}
# What our sampler and training assume (REFERENCE.md "Diffusion"; models/cascade.py hand-offs).
OUR_HAND_OFF = {
    "latent_mean": 42.0,
    "latent_std": 1.0,
    "resolution_multiple": 42.67,
    "latent_dim_scale": 10.67,
}
# Captions whose ids must agree between the folder's tokenizer and open_clip's (no "!": the LAION
# folders' pad token, a documented quirk — see models/hub/clip_tokenizer.py).
PROBE_CAPTIONS = (
    "a red circle on a blue background",
    "Two dogs playing in the snow, photographed at dusk.",
    "a café in Zürich with 3 tables and 12 chairs",
    "",
)
# Files a Hub import needs at the top of a repository and in its component folders (weights: see
# hub_allow_patterns; sample images, ONNX or Flax copies are never fetched).
ROOT_FILES = ("model_index.json", "README.md", SUMMARY_FILE)
CONFIG_SUFFIXES = (".json", ".txt")
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class Component:
    """Where one stage's parts live: the network folder and, for B and C, text encoder/tokenizer/scheduler."""

    network: Path
    text_encoder: Path | None = None
    tokenizer: Path | None = None
    scheduler: Path | None = None
    pipeline_config: dict[str, Any] = field(default_factory=dict)


def hub_allow_patterns(files: list[str]) -> list[str]:
    """The files of a Hub repository an import reads: the top-level index, card and summary, and per
    component folder its configs/tokenizer files and its weights — safetensors when the folder has any,
    else PyTorch ``.bin`` (older repositories hold both; one copy is enough)."""
    chosen = [f for f in files if f in ROOT_FILES]
    folders: dict[str, list[str]] = {}
    for name in files:
        if name.count("/") == 1:
            folders.setdefault(name.split("/")[0], []).append(name)
    for names in folders.values():
        chosen += [n for n in names if n.endswith(CONFIG_SUFFIXES)]
        safetensors = [n for n in names if n.endswith(".safetensors")]
        chosen += safetensors or [n for n in names if n.endswith(".bin")]
    return sorted(chosen)


def resolve_source(source: str | Path, revision: str | None = None, token: str | None = None) -> Path:
    """A local folder as is; a Hub id (``owner/name``) via ``snapshot_download`` (needs the network)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if isinstance(source, str) and REPO_ID.match(source):
        from huggingface_hub import HfApi, snapshot_download

        log.info("downloading %s (revision %s) from the Hub", source, revision or "main")
        files = HfApi(token=token).list_repo_files(source, revision=revision)
        patterns = hub_allow_patterns(files)
        return Path(
            snapshot_download(repo_id=source, revision=revision, allow_patterns=patterns, token=token)
        )
    raise FileNotFoundError(
        f"source {str(source)!r} is neither a local folder nor a Hub repository id (owner/name); pass a folder "
        "holding model_index.json (e.g. one written by `wurst-export`) or an id like warp-ai/wuerstchen"
    )


def _model_index(folder: Path) -> dict[str, Any]:
    path = folder / "model_index.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{folder} has no model_index.json: it is not a diffusers pipeline folder; pass the folder written by "
            "`wurst-export` or by a Würstchen pipeline's save_pretrained"
        )
    return read_json(path)


def _card_prior(folder: Path) -> str | None:
    """The ``prior:`` entry of a decoder folder's model card (diffusers' connected-pipeline convention)."""
    readme = folder / "README.md"
    if not readme.is_file():
        return None
    from huggingface_hub import ModelCard

    prior = getattr(ModelCard.load(readme).data, "prior", None)
    if isinstance(prior, (list, tuple)):
        prior = prior[0] if prior else None
    return str(prior) if prior else None


def _components(
    folder: Path, prior: str | Path | None, revision: str | None, token: str | None
) -> dict[str, Component]:
    index = _model_index(folder)
    kind = index.get("_class_name")

    def from_table(root: Path, table: dict, config: dict) -> dict[str, Component]:
        out = {}
        for stage, (network, encoder, tokenizer, scheduler) in table.items():
            out[stage] = Component(
                root / network,
                root / encoder if encoder else None,
                root / tokenizer if tokenizer else None,
                root / scheduler if scheduler else None,
                {k: v for k, v in config.items() if not k.startswith("_") and not isinstance(v, list)},
            )
        return out

    if kind == COMBINED_PIPELINE:
        if prior is not None:
            raise ValueError(f"{folder} is a {COMBINED_PIPELINE} (it has its own prior); drop prior=")
        return from_table(folder, COMBINED_FOLDERS, {})
    if kind == DECODER_PIPELINE:
        prior_source = prior if prior is not None else _card_prior(folder)
        if prior_source is None:
            raise ValueError(
                f"{folder} is a {DECODER_PIPELINE} without a prior: its model card names none; pass prior=<folder or "
                "Hub id of the WuerstchenPriorPipeline> (for warp-ai/wuerstchen: prior=warp-ai/wuerstchen-prior)"
            )
        prior_folder = resolve_source(prior_source, revision=None, token=token)
        prior_index = _model_index(prior_folder)
        if prior_index.get("_class_name") != PRIOR_PIPELINE:
            raise ValueError(
                f"prior={prior_source} is a {prior_index.get('_class_name')}, not a {PRIOR_PIPELINE}; pass the prior "
                "pipeline's folder or Hub id"
            )
        return {
            **from_table(prior_folder, PRIOR_FOLDERS, prior_index),
            **from_table(folder, DECODER_FOLDERS, index),
        }
    if kind == PRIOR_PIPELINE:
        raise ValueError(
            f"{folder} is a {PRIOR_PIPELINE} alone; import the decoder folder and pass this one as prior= "
            "(e.g. `wurst-export import warp-ai/wuerstchen prior=warp-ai/wuerstchen-prior out=...`)"
        )
    raise ValueError(
        f"{folder}/model_index.json names {kind!r}; expected {COMBINED_PIPELINE}, or {DECODER_PIPELINE} with its prior"
    )


def _our_kwargs(stage: str, dmodel: torch.nn.Module) -> dict[str, Any]:
    """Our constructor kwargs for a loaded diffusers network (lists, not tuples: they go to JSON)."""
    names = [p for p in inspect.signature(OUR_CLASSES[stage].__init__).parameters if p != "self"]
    kwargs = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dmodel.config.items() if k in names}
    if stage == "a":
        kwargs["beta"] = float(dmodel.vquantizer.beta)
    else:
        kwargs["gradient_checkpointing"] = False
    return kwargs


def load_stage(
    stage: str, component: Component, dtype: torch.dtype = torch.float32
) -> tuple[torch.nn.Module, dict]:
    """One stage network as our module (copies of the folder's weights) and its constructor kwargs."""
    cls = DIFFUSERS_CLASSES[stage]
    if not (component.network / DIFFUSERS_CONFIG).is_file():
        raise FileNotFoundError(
            f"{component.network} has no {DIFFUSERS_CONFIG}; the folder lacks its {cls.__name__}"
        )
    dmodel = cls.from_pretrained(component.network, torch_dtype=dtype)
    ours = from_diffusers(dmodel.eval())
    return ours.eval(), _our_kwargs(stage, dmodel)


def load_text_encoder(component: Component, dtype: torch.dtype = torch.float32) -> tuple[TextEncoder, dict]:
    """The folder's transformers CLIP text model as our ``TextEncoder`` (weights copied, padding with the
    tokenizer folder's ``pad_token_id``) and its kwargs."""
    folder = component.text_encoder
    config = CLIPTextConfig.from_pretrained(folder)
    with_projection = "CLIPTextModelWithProjection" in (config.architectures or [])
    model_cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    model = model_cls.from_pretrained(folder, dtype=dtype).eval()
    projection = None
    if "text_projection.weight" not in model.state_dict() and (folder / TEXT_PROJECTION_FILE).is_file():
        projection = load_file(str(folder / TEXT_PROJECTION_FILE))["weight"].to(dtype)
    name = Path(str(getattr(config, "_name_or_path", "") or folder)).name or "clip-text"
    return transformers_to_open_clip(model, tokenizer_pad_token_id(component), projection, f"imported-{name}")


def tokenizer_pad_token_id(component: Component) -> int:
    """The padding id of the folder's tokenizer, which the pipelines pad prompts with (never assumed)."""
    tokenizer = CLIPTokenizer.from_pretrained(component.tokenizer)
    if tokenizer.pad_token_id is None:
        raise ValueError(
            f"the tokenizer in {component.tokenizer} declares no pad_token; diffusers' pipelines pad prompts to "
            "77 tokens with it, so the folder cannot be run as published"
        )
    return int(tokenizer.pad_token_id)


def check_tokenizer(component: Component, text_encoder: TextEncoder) -> dict[str, Any]:
    """Compare the folder's tokenizer with ours (open_clip's BPE, padded with the folder's pad id): the same
    ids at all positions on probe captions. Raises when they differ; returns what was found for the provenance."""
    tokenizer = CLIPTokenizer.from_pretrained(component.tokenizer)
    length = text_encoder.context_length
    theirs = tokenizer(
        list(PROBE_CAPTIONS), padding="max_length", max_length=length, truncation=True, return_tensors="pt"
    ).input_ids
    ours = text_encoder.tokenize(list(PROBE_CAPTIONS))
    if theirs.shape != ours.shape or not torch.equal(theirs, ours):
        raise ValueError(
            f"the tokenizer in {component.tokenizer} does not give open_clip's CLIP BPE ids, which our TextEncoder "
            "uses; only CLIP-BPE text encoders (OpenAI/LAION CLIP) can be imported"
        )
    return {
        "pad_token": tokenizer.pad_token,
        "pad_token_id": int(tokenizer.pad_token_id),
        "model_max_length": tokenizer.model_max_length,
    }


def scheduler_diffusion_config(stage: str, component: Component) -> dict[str, Any]:
    """The folder's DDPMWuerstchenScheduler as our ``diffusion`` config (its cosine offset ``s``), which the
    provenance records so that our sampler and a fine-tune use the same schedule; refuses what we cannot run."""
    path = component.scheduler / SCHEDULER_CONFIG if component.scheduler else None
    config = read_json(path) if path is not None and path.is_file() else {}
    scaler = float(config.get("scaler", 1.0))
    if scaler != 1.0:
        raise ValueError(
            f"Stage {stage.upper()}'s scheduler ({path}) has scaler={scaler}; our cosine schedule has no time "
            'scaling (REFERENCE.md "Diffusion"), so our sampler cannot reproduce this folder'
        )
    return {"schedule": {"name": "cosine", "s": float(config.get("s", COSINE_S))}}


def stage_c_hand_off_of(component: Component, summary: dict[str, Any]) -> dict[str, float]:
    """latent_mean/latent_std of Stage C: ``wurst.json`` (our export), else the prior pipeline's config
    (``WuerstchenPriorPipeline`` folders record them), else the public v2 values (what the combined pipeline uses)."""
    source = summary.get("hand_off") or component.pipeline_config
    return {k: float(source.get(k, v)) for k, v in PIPELINE_HAND_OFF.items()}


def _summary(folder: Path) -> dict[str, Any]:
    path = folder / SUMMARY_FILE
    return read_json(path) if path.is_file() else {}


def _provenance(
    stage: str,
    source: str,
    revision: str | None,
    component: Component,
    params: int,
    summary: dict[str, Any],
    extra: dict[str, Any],
) -> dict[str, Any]:
    facts = (summary.get("stages") or {}).get(stage) or {}
    provenance: dict[str, Any] = {
        "stage": stage,
        "phase": "imported",
        "group": "imported",
        "imported_from": {"source": str(source), "revision": revision, "folder": component.network.name},
        "params": params,
        "steps": facts.get("steps"),
        "samples_seen": facts.get("samples_seen"),
        "git_revision": facts.get("git_revision"),
        "config": {},
        **extra,
    }
    if facts:
        provenance["trained_as"] = {
            k: facts.get(k) for k in ("phase", "global_batch_size", "resolution", "data")
        }
    if isinstance(facts.get("accounting"), dict):
        provenance["accounting"] = dict(facts["accounting"])  # our own export: the ledger comes back
    if component.pipeline_config:
        provenance["pipeline_config"] = component.pipeline_config
    return provenance


def check_cascade_fits(components: dict[str, Component], folder: Path) -> None:
    """Refuse, before any weight is read, a folder whose networks cannot run as one cascade here (latent
    channels or text widths that do not meet): an import that succeeds generates."""
    configs, widths = {}, {}
    for stage, component in components.items():
        if not (component.network / DIFFUSERS_CONFIG).is_file():
            return  # load_stage names the missing file
        configs[stage] = dict(DIFFUSERS_CLASSES[stage].load_config(component.network))
        if component.text_encoder is not None and (component.text_encoder / DIFFUSERS_CONFIG).is_file():
            widths[stage] = int(CLIPTextConfig.from_pretrained(component.text_encoder).hidden_size)
    check_cascade_configs(configs, text_widths=widths, source=str(folder))


def import_diffusers(
    source: str | Path,
    out: str | Path,
    *,
    prior: str | Path | None = None,
    revision: str | None = None,
    token: str | None = None,
    overwrite: bool = False,
    dtype: str = "float32",
) -> Path:
    """Write the Würstchen folder ``source`` as our pipeline directory ``out`` (stage_a/b/c exports).

    Args:
        source: a local diffusers folder or a Hub id (fetched with ``snapshot_download``).
        out: the pipeline directory to create (must not exist unless ``overwrite``).
        prior: the ``WuerstchenPriorPipeline`` folder/id when ``source`` is a decoder pipeline whose model card
            does not name it.
        revision: Hub revision of ``source``.
        dtype: dtype of the written weights (``float32`` for training).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: use one of {sorted(DTYPES)}")
    out = Path(out).absolute()
    check_out_dir(out, overwrite)
    folder = resolve_source(source, revision, token)
    components = _components(folder, prior, revision, token)
    summary = _summary(folder)
    hand_off = stage_c_hand_off_of(components["c"], summary)
    sizes = {**components["b"].pipeline_config, **components["c"].pipeline_config}
    for key in ("resolution_multiple", "latent_dim_scale"):
        if key in sizes and float(sizes[key]) != OUR_HAND_OFF[key]:
            log.warning(
                "%s: %s=%s, but our cascade sampler uses %s (conf/sampler); pass %s=%s to it for this cascade",
                folder,
                key,
                sizes[key],
                OUR_HAND_OFF[key],
                key,
                sizes[key],
            )
    check_cascade_fits(components, folder)
    torch_dtype = DTYPES[dtype]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_dir(out)
    tmp.mkdir()
    try:
        for stage in ("a", "b", "c"):
            component = components[stage]
            export_dir = tmp / f"stage_{stage}" / "export"
            network, kwargs = load_stage(stage, component, torch_dtype)
            state = network.state_dict()
            if stage == "b" and summary.get("hand_off_folded_into_stage_b"):
                # our export folded Stage C's own hand-off into Stage B; back to the weights it trained
                state = absorb_hand_off(state, hand_off, undo=True)
            write_network(export_dir, "model", state, {"_target_": STAGE_TARGETS[stage], **kwargs})
            extra: dict[str, Any] = {}
            if stage in ("b", "c"):
                extra["config"] = {"diffusion": scheduler_diffusion_config(stage, component)}
                text_encoder, text_kwargs = load_text_encoder(component, torch_dtype)
                extra["tokenizer"] = check_tokenizer(component, text_encoder)
                write_network(
                    export_dir,
                    "text_encoder",
                    text_encoder.state_dict(),
                    {"_target_": TEXT_ENCODER_TARGET, **text_kwargs},
                )
            if stage == "c":
                # The hand-off constants the cascade maps Stage C samples with (train writes the same file).
                write_json(export_dir / HAND_OFF_FILE, hand_off)
            if stage == "b" and (folder / COMPRESSOR_FOLDER / TRANSFORMERS_WEIGHTS).is_file():
                compressor_config = read_json(folder / COMPRESSOR_FOLDER / DIFFUSERS_CONFIG)
                if compressor_config.get("_target_") != COMPRESSOR_TARGET:
                    raise ValueError(f"{folder / COMPRESSOR_FOLDER} does not hold a {COMPRESSOR_TARGET}")
                write_network(
                    export_dir,
                    "compressor",
                    load_file(str(folder / COMPRESSOR_FOLDER / TRANSFORMERS_WEIGHTS)),
                    compressor_config,
                )
            elif stage == "b":
                extra["compressor"] = (
                    "not in the source folder (the diffusers layout has none): Stage C training and Stage B "
                    "fine-tuning need a semantic compressor from elsewhere"
                )
            params = sum(p.numel() for p in network.parameters())
            write_json(
                export_dir / "provenance.json",
                _provenance(stage, str(source), revision, component, params, summary, extra),
            )
            del network
        write_json(
            tmp / "pipeline.json",
            {
                "pipeline": "imported",
                "source": str(source),
                "prior": None if prior is None else str(prior),
                "revision": revision,
                "stages": {s: str(out / f"stage_{s}") for s in ("a", "b", "c")},
                "hand_off": {
                    **OUR_HAND_OFF,
                    **components["b"].pipeline_config,
                    **components["c"].pipeline_config,
                    **hand_off,
                },
            },
        )
        move_into_place(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("imported %s → %s", source, out)
    return out
