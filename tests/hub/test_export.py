"""Pipeline directory → diffusers layout: what is written, that diffusers loads it and samples our images."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import torch
from diffusers import WuerstchenCombinedPipeline
from diffusers.pipelines.deprecated.wuerstchen.pipeline_wuerstchen_prior import DEFAULT_STAGE_C_TIMESTEPS
from huggingface_hub import ModelCard
from safetensors import safe_open

from wurst.models.cascade import CascadeSampler
from wurst.models.hub.diffusers_export import export_pipeline
from wurst.models.hub.pipeline_dir import MissingStageError, read_network, read_text_encoder, write_json

IMAGE_SIDE = 128
PROMPT = "a red circle on a blue background"
# float32 CPU, one prompt: our modules (models/stage_*.py, open_clip's attention) against diffusers' and
# transformers' implementations of the same weights. Measured max |Δ| on pixels in [0, 1]: 3e-7 for the
# v2 model-card call (decoder unguided), 5e-6 with both halves guided; 1e-4 leaves room for BLAS
# differences. Without the padding mask (our plain open_clip TextEncoder) the same images differ by
# 9e-4 and 8e-3: the text-state convention, not the stages (see models/hub/clip_text_model.py).
IMAGE_TOLERANCE = 1e-4


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def diffusers_pipe(exported_folder) -> WuerstchenCombinedPipeline:
    pipe = WuerstchenCombinedPipeline.from_pretrained(exported_folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def our_stages(tiny_pipeline_dir) -> dict:
    export = {s: tiny_pipeline_dir / f"stage_{s}" / "export" for s in "abc"}
    return {
        "stage_a": read_network(export["a"]),
        "stage_b": read_network(export["b"]),
        "stage_c": read_network(export["c"]),
        "text_encoder_b": read_text_encoder(export["b"]),
        "text_encoder_c": read_text_encoder(export["c"]),
    }


# ----- the folder ---------------------------------------------------------------------------------
def test_export_writes_every_combined_pipeline_component(exported_folder):
    index = json.loads((exported_folder / "model_index.json").read_text())
    components = [p for p in inspect.signature(WuerstchenCombinedPipeline.__init__).parameters if p != "self"]
    assert index["_class_name"] == "WuerstchenCombinedPipeline"
    assert sorted(k for k in index if not k.startswith("_")) == sorted(components)
    for name in components:
        assert (exported_folder / name).is_dir(), name
    assert (exported_folder / "prior_prior" / "diffusion_pytorch_model.safetensors").is_file()
    assert (exported_folder / "text_encoder" / "model.safetensors").is_file()
    assert (exported_folder / "prior_tokenizer" / "vocab.json").is_file()
    assert (exported_folder / "semantic_compressor" / "model.safetensors").is_file()
    assert (exported_folder / "README.md").is_file() and (exported_folder / "wurst.json").is_file()


def test_weights_are_safetensors_only(exported_folder):
    weights = [
        p for p in exported_folder.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".safetensors")
    ]
    assert weights and all(p.suffix == ".safetensors" for p in weights)


def test_no_partial_folder_is_left_beside_the_export(exported_folder):
    assert [p.name for p in exported_folder.parent.iterdir()] == [exported_folder.name]


def test_stage_weights_are_our_exports_unchanged(exported_folder, tiny_pipeline_dir):
    from safetensors.torch import load_file

    ours = load_file(str(tiny_pipeline_dir / "stage_c" / "export" / "model.safetensors"))
    theirs = load_file(str(exported_folder / "prior_prior" / "diffusion_pytorch_model.safetensors"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_float16_export_casts_every_floating_weight(tiny_pipeline_dir, tmp_path):
    out = export_pipeline(tiny_pipeline_dir, tmp_path / "fp16", dtype="float16")
    for path in (
        out / "decoder" / "diffusion_pytorch_model.safetensors",
        out / "text_encoder" / "model.safetensors",
    ):
        with safe_open(str(path), framework="pt") as f:
            dtypes = {f.get_tensor(k).dtype for k in f.keys()}  # noqa: SIM118 - not iterable
        assert dtypes <= {torch.float16, torch.int64}, (path, dtypes)


# ----- diffusers loads it and samples our images --------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize(
    "settings",
    [
        # The public v2 call (model card): prior on the 30-point v2 grid at w = 4, decoder unguided.
        {"prior_grid": "v2", "prior_w": 4.0, "decoder_steps": 3, "decoder_w": 0.0},
        # Both halves guided.
        {"prior_grid": 3, "prior_w": 4.0, "decoder_steps": 2, "decoder_w": 4.0},
    ],
    ids=["v2-model-card", "both-guided"],
)
def test_diffusers_pipeline_from_the_export_draws_our_cascades_images(diffusers_pipe, our_stages, settings):
    v2 = settings["prior_grid"] == "v2"
    ours = CascadeSampler(
        **our_stages,
        prior_t_grid="v2" if v2 else "linear",
        prior_steps=None if v2 else settings["prior_grid"],
        prior_guidance_scale=settings["prior_w"],
        decoder_steps=settings["decoder_steps"],
        decoder_guidance_scale=settings["decoder_w"],
    )
    expected = diffusers_pipe(
        PROMPT,
        height=IMAGE_SIDE,
        width=IMAGE_SIDE,
        prior_timesteps=DEFAULT_STAGE_C_TIMESTEPS if v2 else None,
        prior_num_inference_steps=30 if v2 else settings["prior_grid"],
        prior_guidance_scale=settings["prior_w"],
        num_inference_steps=settings["decoder_steps"],
        decoder_guidance_scale=settings["decoder_w"],
        generator=seeded(7),
        output_type="pt",
    ).images
    images = ours([PROMPT], IMAGE_SIDE, IMAGE_SIDE, generator=seeded(7))
    assert images.shape == expected.shape == (1, 3, IMAGE_SIDE, IMAGE_SIDE)
    assert (images - expected).abs().max() < IMAGE_TOLERANCE
    # Not a vacuous comparison: the pictures vary 100× more than the tolerance, and few pixels clamp.
    assert expected.std() > 100 * IMAGE_TOLERANCE and ((expected == 0) | (expected == 1)).float().mean() < 0.1


def test_a_different_seed_gives_a_different_image_in_diffusers(diffusers_pipe):
    def draw(seed: int) -> torch.Tensor:
        return diffusers_pipe(
            PROMPT,
            height=IMAGE_SIDE,
            width=IMAGE_SIDE,
            prior_num_inference_steps=2,
            num_inference_steps=2,
            generator=seeded(seed),
            output_type="pt",
        ).images

    assert (draw(1) - draw(2)).abs().max() > 0.01


# ----- clear errors, no partial folder ------------------------------------------------------------
def test_a_missing_stage_is_named_with_the_command_that_makes_it_and_nothing_is_written(
    copy_pipeline, tmp_path
):
    pipeline = copy_pipeline()
    (pipeline / "stage_c" / "export" / "model.safetensors").unlink()
    out = tmp_path / "hub" / "folder"
    with pytest.raises(
        MissingStageError,
        match=r"Stage C's export file .*stage_c/export/model\.safetensors is "
        r"missing.*wurst-train stage=c",
    ):
        export_pipeline(pipeline, out)
    assert not out.exists() and not (out.parent.exists() and any(out.parent.iterdir()))


def test_a_whole_missing_stage_directory_is_a_clear_error(copy_pipeline, tmp_path):
    import shutil

    pipeline = copy_pipeline()
    shutil.rmtree(pipeline / "stage_b")
    with pytest.raises(MissingStageError, match="Stage B's export file"):
        export_pipeline(pipeline, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_failure_midway_removes_the_partial_folder(copy_pipeline, tmp_path):
    """Stage C and its text encoder are written before Stage B's weights turn out not to fit its config."""
    pipeline = copy_pipeline()
    config_path = pipeline / "stage_b" / "export" / "config.json"
    config = json.loads(config_path.read_text())
    write_json(config_path, {**config, "c_hidden": [48, 96]})
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="not compatible with diffusers WuerstchenDiffNeXt"):
        export_pipeline(pipeline, out)
    assert list(tmp_path.iterdir()) == [pipeline]  # neither out nor a .out.partial-* folder


def test_an_existing_out_is_kept_unless_overwrite(tiny_pipeline_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite=true"):
        export_pipeline(tiny_pipeline_dir, out)
    assert (out / "keep.txt").read_text() == "mine"
    export_pipeline(tiny_pipeline_dir, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model_index.json").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("decoder_w", [0.0, 4.0], ids=["released call (decoder unguided)", "guided decoder"])
def test_a_measured_stage_c_hand_off_draws_with_diffusers_defaults_and_no_extra_line(
    copy_pipeline, tmp_path, our_stages, decoder_w
):
    """A Stage C trained on a new compressor's statistics (train writes them to hand_off.json): the combined
    pipeline builds in z = 42·x − 1; the export folds the measured z = 30·x − 0.5 into Stage B, so diffusers
    as loaded, with a negative prompt, draws our cascade's images."""
    pipeline = copy_pipeline()
    write_json(pipeline / "stage_c" / "export" / "hand_off.json", {"latent_mean": 30.0, "latent_std": 0.5})
    out = export_pipeline(pipeline, tmp_path / "out")
    card = (out / "README.md").read_text()
    assert "register_to_config" not in card and "folds that hand-off into Stage B" in card
    summary = json.loads((out / "wurst.json").read_text())
    assert summary["hand_off"] == {"latent_mean": 30.0, "latent_std": 0.5} and summary["hand_off_folded_into_stage_b"]
    pipe = WuerstchenCombinedPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    call = {"height": IMAGE_SIDE, "width": IMAGE_SIDE, "prior_num_inference_steps": 3, "num_inference_steps": 2,
            "decoder_guidance_scale": decoder_w, "output_type": "pt"}
    expected = pipe(PROMPT, negative_prompt="a green square", generator=seeded(3), **call).images
    ours = CascadeSampler(
        **our_stages, prior_t_grid="linear", prior_steps=3, decoder_steps=2, decoder_guidance_scale=decoder_w,
        latent_mean=30.0, latent_std=0.5,
    )
    images = ours([PROMPT], IMAGE_SIDE, IMAGE_SIDE, generator=seeded(3), negative_prompts=["a green square"])
    difference = (images - expected).abs().max()
    print(f"decoder w={decoder_w}: max |Δ| ours vs diffusers = {difference:.2e}")
    if decoder_w == 0.0:
        assert difference < IMAGE_TOLERANCE
    else:
        # The decoder's unconditional half sees zeros of the pipeline's z' (our z = β there), the one thing
        # folding cannot express; the model card says so.
        assert difference > IMAGE_TOLERANCE
    # The images depend on the prompt, so the comparison is not vacuous (random tiny weights: measured 8e-4
    # between these two prompts; a trained pipeline: benchmarks/export_parity.py).
    other = pipe("a yellow star on a black background", negative_prompt="a green square", generator=seeded(3),
                 **call).images
    print(f"prompt effect: {(other - expected).abs().max():.2e}")
    assert (other - expected).abs().max() > 5 * IMAGE_TOLERANCE


def test_export_then_import_restores_a_folded_stage_b_and_its_hand_off(copy_pipeline, tmp_path):
    from safetensors.torch import load_file

    from wurst.models.hub.diffusers_import import import_diffusers

    pipeline = copy_pipeline()
    write_json(pipeline / "stage_c" / "export" / "hand_off.json", {"latent_mean": 30.0, "latent_std": 0.5})
    back = import_diffusers(export_pipeline(pipeline, tmp_path / "out"), tmp_path / "back")
    original = load_file(str(pipeline / "stage_b" / "export" / "model.safetensors"))
    restored = load_file(str(back / "stage_b" / "export" / "model.safetensors"))
    assert max((original[k] - restored[k]).abs().max().item() for k in original) < 1e-6
    assert json.loads((back / "stage_c" / "export" / "hand_off.json").read_text()) == {
        "latent_mean": 30.0, "latent_std": 0.5}


def test_a_stage_trained_on_another_noise_schedule_is_refused(copy_pipeline, tmp_path):
    pipeline = copy_pipeline()
    path = pipeline / "stage_b" / "export" / "provenance.json"
    provenance = json.loads(path.read_text())
    provenance["config"]["diffusion"]["schedule"]["clamp"] = [1.0e-3, 0.999]  # valid, but not diffusers'
    write_json(path, provenance)
    with pytest.raises(
        ValueError, match="Stage B was trained with diffusion.schedule.*DDPMWuerstchenScheduler"
    ):
        export_pipeline(pipeline, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ----- the model card -----------------------------------------------------------------------------
def card(folder: Path) -> ModelCard:
    return ModelCard.load(folder / "README.md")


def test_model_card_metadata_states_steps_samples_hours_energy_and_co2(exported_folder, tiny_pipeline_dir):
    data = card(exported_folder).data.to_dict()
    provenance = {
        s: json.loads((tiny_pipeline_dir / f"stage_{s}" / "export" / "provenance.json").read_text())
        for s in "abc"
    }
    stages = data["training"]["stages"]
    for s in "abc":
        assert stages[f"stage_{s}"]["steps"] == provenance[s]["steps"]
        assert stages[f"stage_{s}"]["samples_seen"] == provenance[s]["samples_seen"]
        assert (
            stages[f"stage_{s}"]["accounting"]["device_hours"] == provenance[s]["accounting"]["device_hours"]
        )
        assert stages[f"stage_{s}"]["accounting"]["energy_kwh"] == provenance[s]["accounting"]["energy_kwh"]
    total_kg = sum(p["accounting"]["co2_kg"] for p in provenance.values())
    assert data["co2_eq_emissions"]["emissions"] == pytest.approx(
        total_kg * 1000, rel=1e-6
    )  # grams (Hub spec)
    assert data["training"]["total"]["device_hours"] == pytest.approx(0.5 + 1.25 + 2.0)
    assert (data["library_name"], data["pipeline_tag"]) == ("diffusers", "text-to-image")


def test_model_card_states_training_data_and_recipe_without_local_paths(exported_folder):
    text = (exported_folder / "README.md").read_text()
    assert "synthetic/{00000..00007}.tar" in text and "min_aesthetic=5.0" in text
    assert "lr=0.0001" in text and "warmup_steps=10" in text
    assert "/home/someone" not in text and "/home/someone" not in (exported_folder / "wurst.json").read_text()


def test_model_card_has_no_connected_prior_entry(exported_folder):
    # diffusers would try to download a `prior:` pipeline named in the card's metadata.
    assert "prior" not in card(exported_folder).data.to_dict()


def test_model_card_without_evaluation_says_where_results_would_come_from(exported_folder):
    assert "model-index" not in card(exported_folder).data.to_dict()
    assert "No evaluation results were found" in (exported_folder / "README.md").read_text()


def test_model_card_reports_evaluation_results_when_present(copy_pipeline, tmp_path):
    pipeline = copy_pipeline()
    write_json(
        pipeline / "eval" / "metrics.json",
        {
            "metrics": {
                "fid": 31.5,
                "inception_score": 12.25,
                "inception_score_std": 0.5,
                "clip_score": 0.26,
            },
            "settings": {"name": "coco30k", "num_images": 30000},
        },
    )
    out = export_pipeline(pipeline, tmp_path / "out", repo_id="someone/wurst-tiny")
    data = card(out).data
    results = {r.metric_type: r.metric_value for r in data.eval_results}
    assert results == {"fid": 31.5, "inception_score": 12.25, "clip_score": 0.26}
    assert data.eval_results[0].dataset_name.startswith("COCO-30K")
    assert "| FID | 31.5 |" in (out / "README.md").read_text()
    assert 'from_pretrained("someone/wurst-tiny")' in (out / "README.md").read_text()


@pytest.mark.slow
def test_wurst_generate_with_a_negative_prompt_draws_the_diffusers_pipelines_image(
    diffusers_pipe, tiny_pipeline_dir, tmp_path
):
    """The command line a user runs, against the pipeline a user loads: same seed, steps, guidance, negative
    prompt (conf/sampler/tiny.yaml: 8 + 6 linear steps at w = 2); both quantise to 8 bits."""
    import subprocess
    import sys

    import numpy as np
    from PIL import Image

    from wurst.train.cascade_loading import sampler_config

    tiny = sampler_config("tiny")
    runs = {}
    for negative in ("a green square on a white background", None):
        out = tmp_path / f"negative-{negative is not None}"
        argv = [str(Path(sys.executable).parent / "wurst-generate"), str(tiny_pipeline_dir), "--prompt", PROMPT,
                "--out", str(out), "--sampler", "tiny", "--seed", "0"]
        done = subprocess.run([*argv, *(["--negative-prompt", negative] if negative else [])],
                              check=False, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        assert f"Stage B linear grid, {tiny['decoder_steps']} steps at w = 2" in done.stdout
        runs[negative] = np.asarray(Image.open(next(out.glob("*.png"))), dtype=np.int16)
    negative = "a green square on a white background"
    expected = diffusers_pipe(
        PROMPT, negative_prompt=negative, height=IMAGE_SIDE, width=IMAGE_SIDE,
        prior_num_inference_steps=tiny["prior_steps"], prior_guidance_scale=tiny["prior_guidance_scale"],
        num_inference_steps=tiny["decoder_steps"], decoder_guidance_scale=tiny["decoder_guidance_scale"],
        generator=seeded(0), output_type="pil",
    ).images[0]
    theirs = np.asarray(expected, dtype=np.int16)
    assert np.abs(runs[negative] - theirs).max() <= 1  # 8-bit rounding of values equal within 1e-4
    # The flag reached the sampler: without it the image is another one (random tiny weights steer weakly,
    # so the two differ by one level in some pixels; the float comparison is in tests/diffusion/test_cascade.py).
    assert (runs[negative] != runs[None]).sum() > (runs[negative] != theirs).sum()
