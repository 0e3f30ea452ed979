"""The model card (``README.md`` with YAML metadata) of an exported cascade.

Everything on the card comes from the pipeline directory: each stage's ``export/provenance.json``
(phase, steps, samples seen, parameters, the resolved training config, and the carbon ledger's
``accounting``: device hours, energy, CO2) and, when present, ``<pipeline_dir>/eval/metrics.json``
(written by ``wurst-eval``). The metadata follows the Hub's model-card spec: ``co2_eq_emissions``
(grams, as the spec asks), ``model-index`` for evaluation results, plus a ``training`` block with the
per-stage facts. Local paths never reach the card: of a shard spec only its last two components are
shown, and the resolved config itself is not published.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import PurePath
from typing import Any

from huggingface_hub import EvalResult, ModelCardData

from wurst.models.hub.layout import COMPRESSOR_FOLDER

STAGE_TITLES = {
    "a": "Stage A (f4 VQGAN)",
    "b": "Stage B (DiffNeXt decoder)",
    "c": "Stage C (text-conditional prior)",
}
# The ledger's figures (train/accounting Ledger.to_dict) that the card and wurst.json keep: enough
# for an import to give back a ledger that `wurst-carbon` reads (device_hours, energy, CO2, samples).
ACCOUNTING_KEYS = (
    "device_hours",
    "wall_hours",
    "energy_kwh",
    "co2_kg",
    "samples",
    "steps",
    "segments",
    "device_name",
    "world_size",
    "pue",
    "carbon_intensity_kg_per_kwh",
    "power_source",
)
# metrics.json keys (eval/report.py) → (Hub metric type, display name).
EVAL_METRICS = {
    "fid": ("fid", "FID"),
    "inception_score": ("inception_score", "Inception Score"),
    "clip_score": ("clip_score", "CLIP score"),
    "pickscore": ("pickscore", "PickScore"),
}
COCO30K_SIZE = 30_000  # REFERENCE.md "Evaluation (COCO-30K)"


def _get(mapping: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(mapping, Mapping) or key not in mapping:
            return None
        mapping = mapping[key]
    return mapping


def _shard_spec_tail(spec: Any) -> str | None:
    """The last two components of a shard spec (``laion-aesthetic/{00000..41407}.tar``): no local paths."""
    if spec is None:
        return None
    if isinstance(spec, (list, tuple)):
        return f"{len(spec)} shard specs" if spec else None
    text = str(spec)
    if text.startswith("pipe:"):
        return "a pipe: command"
    text = text.split("://", 1)[-1]
    return "/".join(PurePath(text).parts[-2:])


def stage_facts(stage: str, provenance: Mapping[str, Any], params: int | None = None) -> dict[str, Any]:
    """The publishable facts of one stage's provenance (JSON-able; what the card and ``wurst.json`` show)."""
    config = provenance.get("config") if isinstance(provenance.get("config"), Mapping) else {}
    accounting = provenance.get("accounting") if isinstance(provenance.get("accounting"), Mapping) else None
    samples = provenance.get("samples_seen")
    if samples is None and accounting is not None:
        samples = accounting.get("samples")
    image = _get(config, "stage", "data", "image_size")
    compressor = _get(config, "stage", "data", "compressor_size")
    if image is None and compressor is None and stage != "c":
        image, compressor = _get(config, "data", "resolution"), _get(config, "data", "compressor_resolution")
    filter_cfg = _get(config, "data", "filter") or {}
    dataset = provenance.get("dataset") if isinstance(provenance.get("dataset"), Mapping) else {}
    optim = _get(config, "optim") or {}
    ema = _get(config, "ema") or {}
    return {
        "stage": stage,
        "phase": provenance.get("phase"),
        "steps": provenance.get("steps"),
        "samples_seen": samples,
        "params": provenance.get("params") if provenance.get("params") is not None else params,
        "global_batch_size": _get(config, "data", "global_batch_size"),
        "max_steps": _get(config, "trainer", "max_steps"),
        "precision": _get(config, "trainer", "precision"),
        "resolution": {"image": image, "compressor": compressor},
        "optimizer": {
            k: optim[k]
            for k in ("name", "lr", "betas", "weight_decay", "warmup_steps", "grad_clip")
            if k in optim
        },
        "ema": {k: ema[k] for k in ("enabled", "start", "every", "beta") if k in ema},
        "data": {
            "shards": _shard_spec_tail(_get(config, "data", "shards")),
            "shard_count": dataset.get("shards"),
            "shard_list_hash": dataset.get("shard_list_hash"),
            "filter": {
                k: v for k, v in filter_cfg.items() if not k.startswith("_") and v not in (None, [], False)
            },
        },
        "accounting": None if accounting is None else {k: accounting.get(k) for k in ACCOUNTING_KEYS},
        "git_revision": provenance.get("git_revision"),
        "imported_from": provenance.get("imported_from"),
    }


def totals(facts: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Sums over stages of device hours, energy, CO2 and samples (None when any stage lacks the figure)."""
    out: dict[str, Any] = {}
    for key in ("device_hours", "energy_kwh", "co2_kg"):
        values = [_get(f, "accounting", key) for f in facts.values()]
        out[key] = None if any(v is None for v in values) else float(sum(values))
    samples = [f.get("samples_seen") for f in facts.values()]
    out["samples_seen"] = None if any(s is None for s in samples) else int(sum(samples))
    params = [f.get("params") for f in facts.values()]
    out["params"] = None if any(p is None for p in params) else int(sum(params))
    return out


def _number(value: Any, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "—"
        return f"{value:,.2f}" if abs(value) >= 100 else f"{value:.{digits}g}"
    return str(value)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def eval_results(eval_metrics: Mapping[str, Any] | None) -> list[EvalResult]:
    """Hub ``model-index`` entries for the numeric metrics of a ``metrics.json``."""
    if not eval_metrics:
        return []
    metrics = eval_metrics.get("metrics", {})
    settings = eval_metrics.get("settings", {})
    images = settings.get("num_images")
    dataset = (
        "COCO-30K (MS-COCO 2014 val captions)"
        if images == COCO30K_SIZE
        else f"{settings.get('name', 'prompts')}"
    )
    results = []
    for key, (metric_type, name) in EVAL_METRICS.items():
        if _finite(metrics.get(key)):
            results.append(
                EvalResult(
                    task_type="text-to-image",
                    dataset_type="coco" if images == COCO30K_SIZE else "prompts",
                    dataset_name=dataset if images is None else f"{dataset}, {images:,} images",
                    metric_type=metric_type,
                    metric_value=float(metrics[key]),
                    metric_name=name,
                )
            )
    return results


def _pruned(value: Any) -> Any:
    """Without None and empty entries: the card's YAML lists what is known (wurst.json keeps every key)."""
    if isinstance(value, Mapping):
        items = {k: _pruned(v) for k, v in value.items()}
        return {k: v for k, v in items.items() if v not in (None, {}, [])}
    return value


def card_metadata(
    facts: Mapping[str, Mapping[str, Any]],
    eval_metrics: Mapping[str, Any] | None,
    model_name: str,
    license: str,
    datasets: list[str] | None = None,
) -> ModelCardData:
    total = totals(facts)
    co2 = None
    if total["co2_kg"] is not None:
        devices = sorted(
            {
                str(_get(f, "accounting", "device_name"))
                for f in facts.values()
                if _get(f, "accounting", "device_name")
            }
        )
        co2 = {
            "emissions": round(total["co2_kg"] * 1000.0, 3),  # the Hub spec asks for grams
            "source": "wurst carbon ledger (energy × PUE × grid intensity, per stage; see `training`)",
            "training_type": "pre-training",
            "hardware_used": ", ".join(devices) if devices else None,
        }
        co2 = {k: v for k, v in co2.items() if v is not None}
    training = _pruned({"stages": {f"stage_{s}": dict(f) for s, f in facts.items()}, "total": total})
    return ModelCardData(
        library_name="diffusers",
        pipeline_tag="text-to-image",
        license=license,
        tags=["text-to-image", "wuerstchen", "diffusers", "wurst"],
        datasets=datasets or None,
        model_name=model_name,
        eval_results=eval_results(eval_metrics) or None,
        co2_eq_emissions=co2,
        training=training,
    )


def _stage_table(facts: Mapping[str, Mapping[str, Any]]) -> list[str]:
    lines = [
        "| stage | phase | params | steps | samples seen | global batch | resolution | GPU hours | energy (kWh) | CO2 (kg) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for stage, f in facts.items():
        res = f.get("resolution") or {}
        resolution = ", ".join(f"{k} {v}" for k, v in res.items() if v is not None) or "—"
        device = _get(f, "accounting", "device_name")
        hours = _number(_get(f, "accounting", "device_hours")) + (f" {device}" if device else "")
        lines.append(
            f"| {STAGE_TITLES.get(stage, stage)} | {f.get('phase') or '—'} | {_number(f.get('params'))} | "
            f"{_number(f.get('steps'))} | {_number(f.get('samples_seen'))} | {_number(f.get('global_batch_size'))} | "
            f"{resolution} | {hours} | {_number(_get(f, 'accounting', 'energy_kwh'))} | "
            f"{_number(_get(f, 'accounting', 'co2_kg'))} |"
        )
    total = totals(facts)
    lines.append(
        f"| **total** | | {_number(total['params'])} | | {_number(total['samples_seen'])} | | | "
        f"{_number(total['device_hours'])} | {_number(total['energy_kwh'])} | {_number(total['co2_kg'])} |"
    )
    return lines


def _data_lines(facts: Mapping[str, Mapping[str, Any]], datasets: list[str] | None) -> list[str]:
    lines = []
    if datasets:
        lines.append("Datasets: " + ", ".join(f"`{d}`" for d in datasets) + ".")
    for stage, f in facts.items():
        data = f.get("data") or {}
        parts = []
        if data.get("shards"):
            parts.append(f"shards `{data['shards']}`")
        if data.get("shard_count") is not None:
            parts.append(f"{data['shard_count']:,} shards (list hash `{data.get('shard_list_hash')}`)")
        if data.get("filter"):
            parts.append("filter " + ", ".join(f"{k}={v}" for k, v in data["filter"].items()))
        if f.get("imported_from"):
            parts.append(f"imported from `{_get(f, 'imported_from', 'source')}` (training data not recorded)")
        lines.append(
            f"- {STAGE_TITLES.get(stage, stage)}: " + ("; ".join(parts) if parts else "not recorded") + "."
        )
    return lines


def _recipe_lines(facts: Mapping[str, Mapping[str, Any]]) -> list[str]:
    lines = []
    for stage, f in facts.items():
        optim, ema = f.get("optimizer") or {}, f.get("ema") or {}
        parts = []
        if optim:
            parts.append("optimizer " + ", ".join(f"{k}={v}" for k, v in optim.items()))
        if ema:
            parts.append("EMA " + ", ".join(f"{k}={v}" for k, v in ema.items()))
        if f.get("max_steps") is not None:
            parts.append(f"max_steps={f['max_steps']}")
        if f.get("precision") is not None:
            parts.append(f"precision={f['precision']}")
        lines.append(
            f"- {STAGE_TITLES.get(stage, stage)}: " + ("; ".join(parts) if parts else "not recorded") + "."
        )
    return lines


def _eval_lines(eval_metrics: Mapping[str, Any] | None) -> list[str]:
    if not eval_metrics:
        return [
            "No evaluation results were found (`<pipeline_dir>/eval/metrics.json`, written by `wurst-eval`)."
        ]
    metrics = eval_metrics.get("metrics", {})
    settings = eval_metrics.get("settings", {})
    images = settings.get("num_images")
    lines = ["| metric | value |", "|---|---|"]
    for key, (_, name) in EVAL_METRICS.items():
        if key in metrics:
            std = metrics.get(f"{key}_std")
            lines.append(
                f"| {name} | {_number(metrics[key], 4)}"
                + (f" ± {_number(std, 3)}" if _finite(std) else "")
                + " |"
            )
    for other, value in sorted((metrics.get("pickscore_preference") or {}).items()):
        if _finite(value):
            lines.append(f"| PickScore preference over {other} | {value:.1%} |")
    lines.append("")
    lines.append(f"Prompt set `{settings.get('name', '—')}`, {_number(images)} images.")
    if images is not None and images != COCO30K_SIZE:
        lines.append(
            "FID over fewer than 30,000 images is not comparable with the paper's FID-30K (it is biased upward)."
        )
    return lines


def model_card(
    facts: Mapping[str, Mapping[str, Any]],
    eval_metrics: Mapping[str, Any] | None = None,
    *,
    model_name: str,
    repo_id: str | None = None,
    license: str = "mit",
    datasets: list[str] | None = None,
    has_compressor: bool = True,
    hand_off: Mapping[str, float] | None = None,
) -> str:
    """The whole ``README.md``: YAML metadata between ``---`` lines, then the card's text.

    ``hand_off``: Stage C's latent_mean/latent_std when they are not the 42/1 the combined pipeline
    builds in (a Stage C trained on a new compressor's measured statistics); the usage code then sets them.
    """
    metadata = card_metadata(facts, eval_metrics, model_name, license, datasets)
    where = repo_id or "path/to/this/folder"
    hand_off_note = []
    if hand_off is not None:
        hand_off_note = [
            "",
            (
                f"This Stage C was trained on its own compressor's statistics (z = {hand_off['latent_mean']!r}·x − "
                f"{hand_off['latent_std']!r}); the export folds that hand-off into Stage B's effnet mappers, so the "
                "pipeline's built-in 42·x − 1 is right as it is. With decoder_guidance_scale > 1 the decoder's "
                "unconditional half then sees a constant latent rather than the zeros it trained on; the released "
                "call runs the decoder unguided."
            ),
        ]
    body = [
        f"# {model_name}",
        "",
        (
            "A Würstchen v2 text-to-image cascade (Pernias et al., *Würstchen: An Efficient Architecture for "
            "Large-Scale Text-to-Image Diffusion Models*, ICLR 2024) trained with "
            "wurst (staged Würstchen training) and exported to the diffusers layout: Stage C (prior, CLIP-bigG text) → "
            "Stage B (decoder, CLIP-H text) → Stage A (VQGAN)."
        ),
        "",
        "## Use",
        "",
        "```python",
        "import torch",
        "from diffusers import WuerstchenCombinedPipeline",
        "from diffusers.pipelines.deprecated.wuerstchen.pipeline_wuerstchen_prior import DEFAULT_STAGE_C_TIMESTEPS",
        "",
        f'pipe = WuerstchenCombinedPipeline.from_pretrained("{where}")',
        'images = pipe("an image of a shiba inu, donning a spacesuit and helmet", height=1024, width=1024,',
        "              prior_timesteps=DEFAULT_STAGE_C_TIMESTEPS, prior_guidance_scale=4.0,",
        "              decoder_guidance_scale=0.0).images",
        "```",
        *hand_off_note,
        "",
        "Or with wurst: `wurst-export import " + where + " out=outputs/imported`, then `wurst-generate` / "
        "`wurst-eval pipeline=outputs/imported` / `wurst-train init_from.path=outputs/imported/stage_c/export`.",
        "",
        "## Training",
        "",
        *_stage_table(facts),
        "",
        (
            "GPU hours are device hours in the fit loop; energy is measured (NVML) or estimated from board power; "
            "CO2 = energy × PUE × grid intensity (the ML CO2 Impact method), per stage, from each export's "
            "`provenance.json` ledger."
        ),
        "",
        "### Training data",
        "",
        *_data_lines(facts, datasets),
        "",
        "### Recipe",
        "",
        *_recipe_lines(facts),
        "",
        "## Evaluation",
        "",
        *_eval_lines(eval_metrics),
        "",
        "## Notes",
        "",
        (
            "- Text encoders were converted from open_clip to transformers `CLIPTextModel` (same weights; hidden "
            "states agree to float rounding). diffusers' pipelines pass the tokenizer's attention mask, so the text "
            "states at padding positions are computed with padding keys masked; wurst's open_clip encoder does not "
            "mask them. States up to the end-of-text token are identical; padding positions differ."
        ),
        (
            "- `text_encoder/text_projection.safetensors` and `prior_text_encoder/text_projection.safetensors` keep "
            "open_clip's pooled projection (unused by the Würstchen pipelines)."
        ),
    ]
    if has_compressor:
        body.append(
            f"- `{COMPRESSOR_FOLDER}/` holds Stage B's jointly trained semantic compressor (EfficientNet features → "
            "16-channel latents), which Stage C training needs; diffusers does not load it."
        )
    revisions = sorted({str(f["git_revision"]) for f in facts.values() if f.get("git_revision")})
    if revisions:
        body.append("- Trained at wurst git revision(s) " + ", ".join(f"`{r}`" for r in revisions) + ".")
    return "---\n" + metadata.to_yaml() + "\n---\n\n" + "\n".join(body) + "\n"
