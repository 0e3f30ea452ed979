"""Pipeline directory → a diffusers-layout folder that ``WuerstchenCombinedPipeline.from_pretrained`` loads.

The folder (see models/hub/layout.py for the table) holds the three stages with diffusers' config and
``diffusion_pytorch_model.safetensors`` files, both text encoders converted from open_clip to
transformers' ``CLIPTextModel`` with their tokenizers, two ``DDPMWuerstchenScheduler`` configs,
``model_index.json``, the model card ``README.md``, Stage B's semantic compressor and ``wurst.json``.

Stage weights are not re-instantiated: our state dicts already carry diffusers' names, so they are
checked against the diffusers class built on the meta device and written as they are (optionally cast
to float16/bfloat16). Everything is written into a hidden ``.<out>.partial-<pid>`` folder beside
``out`` and renamed to ``out`` only when complete, so a failure never leaves a folder that looks whole.
"""

from __future__ import annotations

import inspect
import logging
import os
import re
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import diffusers
import torch
import transformers
from diffusers import DDPMWuerstchenScheduler
from diffusers.pipelines.deprecated.wuerstchen import PaellaVQModel, WuerstchenDiffNeXt, WuerstchenPrior

from wurst.models.diffusers_compat import check_state_dict_compatible
from wurst.models.diffusion import CLAMP
from wurst.models.hub.clip_text_model import (
    TEXT_PROJECTION_FILE,
    clip_text_config,
    to_transformers_state_dict,
)
from wurst.models.hub.clip_tokenizer import token_of_id, write_clip_tokenizer
from wurst.models.hub.layout import (
    COMBINED_FOLDERS,
    COMBINED_PIPELINE,
    COMPRESSOR_FOLDER,
    DIFFUSERS_CONFIG,
    DIFFUSERS_WEIGHTS,
    SUMMARY_FILE,
    TRANSFORMERS_WEIGHTS,
    combined_components,
)
from wurst.models.hub.model_card import model_card, stage_facts
from wurst.models.hub.pipeline_dir import (
    check_pipeline_dir,
    config_file,
    count_parameters,
    read_config,
    read_json,
    read_provenance,
    read_state_dict,
    read_text_encoder,
    trained_diffusion_settings,
    weights_file,
    write_json,
    write_safetensors,
)

log = logging.getLogger(__name__)

DIFFUSERS_CLASSES = {"a": PaellaVQModel, "b": WuerstchenDiffNeXt, "c": WuerstchenPrior}
# Our constructor arguments that diffusers' classes lack; they do not change the weights
# (beta weights Stage A's commitment loss; gradient checkpointing is a training switch).
OURS_ONLY = {"a": ("beta",), "b": ("gradient_checkpointing",), "c": ("gradient_checkpointing",)}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# The hand-off z = latent_mean·x − latent_std that WuerstchenCombinedPipeline builds its prior pipeline
# with (REFERENCE.md "Hand-offs"); it has no argument to change them.
PIPELINE_HAND_OFF = {"latent_mean": 42.0, "latent_std": 1.0}
HAND_OFF_FILE = "hand_off.json"


def _diffusers_kwargs(stage: str, config: Mapping[str, Any], source: Path) -> dict[str, Any]:
    cls = DIFFUSERS_CLASSES[stage]
    names = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    kwargs = {k: v for k, v in config.items() if k != "_target_"}
    unknown = sorted(set(kwargs) - set(names) - set(OURS_ONLY[stage]))
    if unknown:
        raise ValueError(
            f"{source}: arguments {unknown} have no counterpart in diffusers {cls.__name__}; such a network "
            "cannot be exported to the diffusers layout"
        )
    return {k: v for k, v in kwargs.items() if k in names}


def _cast(state: Mapping[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    # Only floating tensors change dtype (BatchNorm's num_batches_tracked stays an integer).
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}


def _check_diffusion_settings(stage: str, provenance: Mapping[str, Any]) -> float:
    """The schedule's s for the scheduler config; refuses settings diffusers' pipelines cannot express."""
    settings = trained_diffusion_settings(provenance, f"Stage {stage.upper()}'s provenance")
    if settings.clamp != CLAMP:
        raise ValueError(
            f"Stage {stage.upper()} was trained with diffusion.schedule clamp={list(settings.clamp)}, but diffusers' "
            f"DDPMWuerstchenScheduler fixes the cosine schedule clamped to {list(CLAMP)}; the exported "
            "folder would sample a different process"
        )
    return settings.s


def stage_c_hand_off(export_dir: Path, provenance: Mapping[str, Any]) -> dict[str, float]:
    """Stage C's hand-off constants: ``hand_off.json`` (written by training, measured when the compressor is
    new), else the training config's ``diffusion.latent_mean/latent_std``, else the public v2 values."""
    path = export_dir / HAND_OFF_FILE
    if path.is_file():
        data = read_json(path)
    else:
        data = (provenance.get("config") or {}).get("diffusion") or {}
    try:
        return {k: float(data.get(k, v)) for k, v in PIPELINE_HAND_OFF.items()}
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path}: latent_mean and latent_std must be numbers ({error})") from error


_EFFNET_MAPPER = re.compile(r"^effnet_mappers\.(\d+)\.weight$")


def hand_off_affine(hand_off: Mapping[str, float]) -> tuple[float, float]:
    """(α, β) with z = α·z' + β, where z = latent_mean·x − latent_std is what Stage B was trained on and
    z' = 42·x − 1 what WuerstchenCombinedPipeline hands it (its prior pipeline's built-in constants)."""
    mean, std = float(hand_off["latent_mean"]), float(hand_off["latent_std"])
    pipe_mean, pipe_std = PIPELINE_HAND_OFF["latent_mean"], PIPELINE_HAND_OFF["latent_std"]
    alpha = mean / pipe_mean
    return alpha, alpha * pipe_std - std


def absorb_hand_off(state: Mapping[str, torch.Tensor], hand_off: Mapping[str, float], *, undo: bool = False) -> dict:
    """Stage B weights that take z' (the pipeline's hand-off) and compute what the trained ones compute on z.

    z enters Stage B only through bicubic resizing (linear, and it keeps constants) and the 1×1
    ``effnet_mappers`` convolutions, so W·(α·z' + β) + b = (α·W)·z' + (b + β·ΣW): the affine hand-off
    folds into those weights and biases exactly (float rounding aside). ``undo`` maps back (import)."""
    alpha, beta = hand_off_affine(hand_off)
    if not alpha > 0:
        raise ValueError(f"Stage C's hand-off {dict(hand_off)} has latent_mean ≤ 0: it cannot be folded into Stage B")
    out = dict(state)
    for key, weight in state.items():
        if not _EFFNET_MAPPER.match(key):
            continue
        bias_key = key[: -len("weight")] + "bias"
        if bias_key not in state:
            raise ValueError(f"Stage B's {key} has no bias, so the hand-off's offset cannot be folded into it")
        w, b = weight.double(), state[bias_key].double()
        if undo:
            w = w / alpha
            b = b - beta * w.sum(dim=(1, 2, 3))
        else:
            b = b + beta * w.sum(dim=(1, 2, 3))
            w = w * alpha
        out[key], out[bias_key] = w.to(weight.dtype), b.to(state[bias_key].dtype)
    return out


def _write_stage(
    stage: str, export_dir: Path, folder: Path, dtype: torch.dtype, hand_off: Mapping[str, float] | None = None
) -> dict[str, Any]:
    cls = DIFFUSERS_CLASSES[stage]
    config = read_config(export_dir)
    kwargs = _diffusers_kwargs(stage, config, config_file(export_dir, "model"))
    state = read_state_dict(export_dir)
    if stage == "b" and hand_off is not None and dict(hand_off) != PIPELINE_HAND_OFF:
        state = absorb_hand_off(state, hand_off)
    check_state_dict_compatible(state, cls, kwargs)
    write_safetensors(folder / DIFFUSERS_WEIGHTS, _cast(state, dtype))
    write_json(
        folder / DIFFUSERS_CONFIG,
        {"_class_name": cls.__name__, "_diffusers_version": diffusers.__version__, **kwargs},
    )
    return kwargs


def _write_text_encoder(
    export_dir: Path, encoder_folder: Path, tokenizer_folder: Path, dtype: torch.dtype
) -> int:
    """open_clip text tower → transformers CLIPTextModel folder + CLIPTokenizer folder; returns the width."""
    text_encoder = read_text_encoder(export_dir)
    config = clip_text_config(text_encoder)
    config.architectures = ["CLIPTextModel"]
    config.dtype = dtype
    state = to_transformers_state_dict(text_encoder)
    projection = state.pop("text_projection.weight", None)
    encoder_folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(encoder_folder)
    write_safetensors(encoder_folder / TRANSFORMERS_WEIGHTS, _cast(state, dtype))
    if projection is not None:
        write_safetensors(encoder_folder / TEXT_PROJECTION_FILE, {"weight": projection.to(dtype)})
    # open_clip's own BPE vocabulary, padding with the id our text encoder pads with (clip_tokenizer.py).
    write_clip_tokenizer(
        tokenizer_folder, context_length=text_encoder.context_length, pad_token=token_of_id(text_encoder.pad_token_id)
    )
    return int(text_encoder.width)


def _check_widths(stage_kwargs: Mapping[str, Mapping[str, Any]], widths: Mapping[str, int]) -> None:
    c, b = stage_kwargs["c"], stage_kwargs["b"]
    if c.get("c_cond") != widths["c"]:
        raise ValueError(
            f"Stage C's c_cond={c.get('c_cond')} but its text encoder is {widths['c']} wide; the export is inconsistent"
        )
    if b.get("clip_embd") != widths["b"]:
        raise ValueError(
            f"Stage B's clip_embd={b.get('clip_embd')} but its text encoder is {widths['b']} wide; the export is "
            "inconsistent"
        )
    if c.get("c_in") != b.get("effnet_embd"):
        raise ValueError(
            f"Stage C samples {c.get('c_in')}-channel latents but Stage B's effnet_embd={b.get('effnet_embd')}; "
            "export a Stage C trained on this Stage B's compressor"
        )


def read_eval_metrics(pipeline_dir: str | Path) -> dict[str, Any] | None:
    """``<pipeline_dir>/eval/metrics.json`` (written by ``wurst-eval``) when present."""
    path = Path(pipeline_dir) / "eval" / "metrics.json"
    return read_json(path) if path.is_file() else None


def partial_dir(out: Path) -> Path:
    """Where a folder is built before it is renamed to ``out``: hidden and clearly marked partial."""
    return out.parent / f".{out.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def check_out_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise FileExistsError(
            f"out={out} already exists; pass overwrite=true to replace it, or choose another out"
        )
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"out={out} exists and is not a directory; choose another out")


def move_into_place(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished ``tmp`` folder to ``out`` (replacing an existing ``out`` when allowed)."""
    check_out_dir(out, overwrite)
    if out.exists():
        old = out.parent / f".{out.name}.replaced-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def export_pipeline(
    pipeline_dir: str | Path,
    out: str | Path,
    *,
    overwrite: bool = False,
    dtype: str = "float32",
    model_name: str | None = None,
    repo_id: str | None = None,
    license: str = "mit",
    datasets: list[str] | None = None,
) -> Path:
    """Write ``pipeline_dir``'s three stages as a diffusers ``WuerstchenCombinedPipeline`` folder at ``out``.

    Args:
        pipeline_dir: a pipeline directory (``stage_a/``, ``stage_b/``, ``stage_c/`` with exports).
        out: the folder to create (it must not exist unless ``overwrite``).
        dtype: ``float32`` (default), ``float16`` or ``bfloat16`` for every floating weight.
        model_name, repo_id, license, datasets: model card fields (``datasets``: Hub dataset ids).
    Returns ``out``. A missing stage export raises before anything is written; any later failure removes
    the partial folder, so ``out`` exists only when complete.
    """
    pipeline_dir, out = Path(pipeline_dir), Path(out).absolute()
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: use one of {sorted(DTYPES)}")
    exports = check_pipeline_dir(pipeline_dir)
    provenance = {stage: read_provenance(d) for stage, d in exports.items()}
    schedule_s = {stage: _check_diffusion_settings(stage, provenance[stage]) for stage in ("b", "c")}
    hand_off = stage_c_hand_off(exports["c"], provenance["c"])
    if hand_off != PIPELINE_HAND_OFF:
        log.info(
            "Stage C's hand-off %s differs from the %s WuerstchenCombinedPipeline builds in: folded into Stage B's "
            "effnet mappers, so the folder draws with diffusers' defaults",
            hand_off,
            PIPELINE_HAND_OFF,
        )
    check_out_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch_dtype = DTYPES[dtype]

    tmp = partial_dir(out)
    tmp.mkdir()
    try:
        stage_kwargs, widths = {}, {}
        for stage in ("c", "b", "a"):  # inference order, as the table in layout.py
            network, encoder, tokenizer, scheduler = COMBINED_FOLDERS[stage]
            log.info("Stage %s → %s/", stage.upper(), network)
            stage_kwargs[stage] = _write_stage(stage, exports[stage], tmp / network, torch_dtype, hand_off)
            if encoder is not None:
                widths[stage] = _write_text_encoder(
                    exports[stage], tmp / encoder, tmp / tokenizer, torch_dtype
                )
                DDPMWuerstchenScheduler(scaler=1.0, s=schedule_s[stage]).save_config(tmp / scheduler)
        _check_widths(stage_kwargs, widths)

        has_compressor = weights_file(exports["b"], "compressor").is_file()
        if has_compressor:
            compressor_dir = tmp / COMPRESSOR_FOLDER
            write_safetensors(
                compressor_dir / TRANSFORMERS_WEIGHTS, read_state_dict(exports["b"], "compressor")
            )
            write_json(compressor_dir / DIFFUSERS_CONFIG, read_config(exports["b"], "compressor"))
        else:
            log.warning("Stage B's export has no compressor: the folder will not hold %s/", COMPRESSOR_FOLDER)

        write_json(
            tmp / "model_index.json",
            {
                "_class_name": COMBINED_PIPELINE,
                "_diffusers_version": diffusers.__version__,
                **{name: list(entry) for name, entry in combined_components().items()},
            },
        )
        facts = {
            stage: stage_facts(
                stage, provenance[stage], count_parameters(weights_file(exports[stage], "model"))
            )
            for stage in ("c", "b", "a")
        }
        eval_metrics = read_eval_metrics(pipeline_dir)
        name = model_name or (repo_id.split("/")[-1] if repo_id else f"wurst-{pipeline_dir.absolute().name}")
        (tmp / "README.md").write_text(
            model_card(
                facts,
                eval_metrics,
                model_name=name,
                repo_id=repo_id,
                license=license,
                datasets=datasets,
                has_compressor=has_compressor,
                hand_off=None if hand_off == PIPELINE_HAND_OFF else hand_off,
            ),
            encoding="utf-8",
        )
        write_json(
            tmp / SUMMARY_FILE,
            {
                "format": "wurst-diffusers-export",
                "format_version": 1,
                "pipeline": pipeline_dir.absolute().name,
                "dtype": dtype,
                "hand_off": hand_off,
                # Stage B's effnet mappers take the pipeline's z' = 42·x − 1 (absorb_hand_off); import undoes it.
                "hand_off_folded_into_stage_b": hand_off != PIPELINE_HAND_OFF,
                "stages": facts,
                "eval": None
                if eval_metrics is None
                else {
                    "metrics": eval_metrics.get("metrics"),
                    "num_images": (eval_metrics.get("settings") or {}).get("num_images"),
                    "name": (eval_metrics.get("settings") or {}).get("name"),
                },
                "versions": {"diffusers": diffusers.__version__, "transformers": transformers.__version__},
            },
        )
        move_into_place(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %s → %s", pipeline_dir, out)
    return out
