"""diffusers-layout folder → our networks and pipeline directory: same outputs in our sampler."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import (
    DDPMWuerstchenScheduler,
    WuerstchenCombinedPipeline,
    WuerstchenDecoderPipeline,
    WuerstchenPriorPipeline,
)
from diffusers.pipelines.deprecated.wuerstchen import PaellaVQModel, WuerstchenDiffNeXt, WuerstchenPrior
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from wurst.models.cascade import CascadeSampler
from wurst.models.hub.clip_tokenizer import write_clip_tokenizer
from wurst.models.hub.diffusers_import import hub_allow_patterns, import_diffusers
from wurst.models.hub.pipeline_dir import read_network, read_provenance, read_text_encoder

IMAGE_SIDE = 128
PROMPT = "a red circle on a blue background"
IMAGE_TOLERANCE = 1e-4  # float32 CPU, one prompt (see test_export.py); measured max |Δ| 1e-6


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randomise(module: torch.nn.Module, seed: int, std: float) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            fan_in = parameter[0].numel() if parameter.ndim >= 2 else 1
            scale = std if parameter.ndim < 2 else min(std, fan_in**-0.5)
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
    return module.eval()


def clip_text_model(seed: int, act: str) -> CLIPTextModel:
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        hidden_act=act,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=0,
    )
    return CLIPTextModel(config).eval()


@pytest.fixture(scope="module")
def clip_tokenizer(tmp_path_factory) -> CLIPTokenizer:
    return CLIPTokenizer.from_pretrained(write_clip_tokenizer(tmp_path_factory.mktemp("tokenizer")))


@pytest.fixture(scope="module")
def diffusers_parts(clip_tokenizer) -> dict:
    """Tiny diffusers Würstchen networks (seeded noise) and two CLIP text models (gelu and quick_gelu)."""
    prior = randomise(WuerstchenPrior(c_in=16, c=32, c_cond=64, c_r=64, depth=2, nhead=2), seed=1, std=0.02)
    decoder = randomise(
        WuerstchenDiffNeXt(
            c_in=4,
            c_out=4,
            c_r=64,
            patch_size=2,
            c_cond=32,
            c_hidden=[16, 32],
            nhead=[-1, 2],
            blocks=[1, 1],
            level_config=["CT", "CTA"],
            inject_effnet=[False, True],
            effnet_embd=16,
            clip_embd=64,
        ),
        seed=2,
        std=0.02,
    )
    vqgan = randomise(
        PaellaVQModel(levels=2, bottleneck_blocks=1, embed_dim=16, latent_channels=4, num_vq_embeddings=32),
        seed=3,
        std=0.05,
    )
    with torch.no_grad():
        vqgan.out_block[0].bias.fill_(0.5)
    return {
        "prior": prior,
        "decoder": decoder,
        "vqgan": vqgan,
        "tokenizer": clip_tokenizer,
        "text_c": clip_text_model(4, "gelu"),
        "text_b": clip_text_model(5, "quick_gelu"),
    }


@pytest.fixture(scope="module")
def combined_pipe(diffusers_parts) -> WuerstchenCombinedPipeline:
    p = diffusers_parts
    pipe = WuerstchenCombinedPipeline(
        tokenizer=p["tokenizer"],
        text_encoder=p["text_b"],
        decoder=p["decoder"],
        scheduler=DDPMWuerstchenScheduler(),
        vqgan=p["vqgan"],
        prior_tokenizer=p["tokenizer"],
        prior_text_encoder=p["text_c"],
        prior_prior=p["prior"],
        prior_scheduler=DDPMWuerstchenScheduler(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def saved_folder(combined_pipe, tmp_path_factory) -> Path:
    """What diffusers' own save_pretrained writes for a combined pipeline."""
    folder = tmp_path_factory.mktemp("diffusers") / "combined"
    combined_pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def imported_dir(saved_folder, tmp_path_factory) -> Path:
    return import_diffusers(saved_folder, tmp_path_factory.mktemp("imported") / "pipeline")


def export_dir(pipeline_dir: Path, stage: str) -> Path:
    return pipeline_dir / f"stage_{stage}" / "export"


def our_cascade(pipeline_dir: Path, **settings) -> CascadeSampler:
    return CascadeSampler(
        stage_c=read_network(export_dir(pipeline_dir, "c")),
        stage_b=read_network(export_dir(pipeline_dir, "b")),
        stage_a=read_network(export_dir(pipeline_dir, "a")),
        text_encoder_c=read_text_encoder(export_dir(pipeline_dir, "c")),
        text_encoder_b=read_text_encoder(export_dir(pipeline_dir, "b")),
        **settings,
    )


# ----- layout of what is written ------------------------------------------------------------------
def test_import_writes_a_pipeline_directory_as_wurst_train_does(imported_dir):
    for stage in "abc":
        names = {p.name for p in export_dir(imported_dir, stage).iterdir()}
        assert {"model.safetensors", "config.json", "provenance.json"} <= names
    assert {"text_encoder.safetensors", "text_encoder_config.json"} <= {
        p.name for p in export_dir(imported_dir, "c").iterdir()
    }
    assert json.loads((imported_dir / "pipeline.json").read_text())["pipeline"] == "imported"
    assert (
        json.loads((export_dir(imported_dir, "c") / "config.json").read_text())["_target_"]
        == "wurst.models.stage_c.StageC"
    )


def test_imported_weights_are_the_folders_weights(imported_dir, diffusers_parts):
    for stage, network in (("c", "prior"), ("b", "decoder"), ("a", "vqgan")):
        ours = load_file(str(export_dir(imported_dir, stage) / "model.safetensors"))
        theirs = diffusers_parts[network].state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_imported_text_encoders_give_the_clip_text_models_states(
    imported_dir, diffusers_parts, clip_tokenizer
):
    tokens = clip_tokenizer(
        [PROMPT, ""], padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    )
    for stage, name in (("c", "text_c"), ("b", "text_b")):
        hidden, _ = read_text_encoder(export_dir(imported_dir, stage))([PROMPT, ""])
        # as diffusers' pipelines call it: the tokenizer's ids and attention mask
        expected = diffusers_parts[name](tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
        assert (hidden - expected).abs().max() < 1e-5


def test_provenance_says_where_the_weights_came_from(imported_dir, saved_folder):
    provenance = read_provenance(export_dir(imported_dir, "c"))
    assert provenance["imported_from"]["source"] == str(saved_folder)
    assert provenance["phase"] == "imported" and provenance["steps"] is None
    assert "accounting" not in provenance  # the cost of someone else's training is unknown, not zero
    assert provenance["tokenizer"]["pad_token_id"] == 49407  # the folder's tokenizer's, as written
    assert "compressor" in read_provenance(export_dir(imported_dir, "b"))  # the note that none was imported


# ----- same outputs in our sampler ----------------------------------------------------------------
@pytest.mark.slow
def test_our_sampler_on_the_imported_directory_draws_the_diffusers_pipelines_images(
    imported_dir, combined_pipe
):
    expected = combined_pipe(
        PROMPT,
        height=IMAGE_SIDE,
        width=IMAGE_SIDE,
        prior_num_inference_steps=3,
        prior_guidance_scale=4.0,
        num_inference_steps=2,
        decoder_guidance_scale=4.0,
        generator=seeded(5),
        output_type="pt",
    ).images
    cascade = our_cascade(
        imported_dir,
        prior_t_grid="linear",
        prior_steps=3,
        prior_guidance_scale=4.0,
        decoder_steps=2,
        decoder_guidance_scale=4.0,
    )
    images = cascade([PROMPT], IMAGE_SIDE, IMAGE_SIDE, generator=seeded(5))
    assert (images - expected).abs().max() < IMAGE_TOLERANCE
    assert expected.std() > 100 * IMAGE_TOLERANCE and ((expected == 0) | (expected == 1)).float().mean() < 0.1


def test_train_and_eval_loaders_read_the_imported_directory(imported_dir):
    """wurst-train init_from and wurst-eval read exports through train/export.py and train/cascade_loading.py."""
    from wurst.train.cascade_loading import load_text_encoder
    from wurst.train.export import load_network, require_export

    for stage, name in (("a", "StageA"), ("b", "StageB"), ("c", "StageC")):
        require_export(export_dir(imported_dir, stage), stage)
        assert type(load_network(export_dir(imported_dir, stage))).__name__ == name
    assert load_text_encoder(export_dir(imported_dir, "c")).width == 64
    assert json.loads((export_dir(imported_dir, "c") / "hand_off.json").read_text()) == {
        "latent_mean": 42.0,
        "latent_std": 1.0,
    }


# ----- our own export comes back whole --------------------------------------------------------------
def test_export_then_import_restores_weights_compressor_and_ledger(
    exported_folder, tiny_pipeline_dir, tmp_path
):
    back = import_diffusers(exported_folder, tmp_path / "back")
    for stage in "abc":
        original = load_file(str(export_dir(tiny_pipeline_dir, stage) / "model.safetensors"))
        restored = load_file(str(export_dir(back, stage) / "model.safetensors"))
        assert all(torch.equal(original[k], restored[k]) for k in original)
        before, after = (
            read_provenance(export_dir(tiny_pipeline_dir, stage)),
            read_provenance(export_dir(back, stage)),
        )
        assert after["steps"] == before["steps"] and after["samples_seen"] == before["samples_seen"]
        assert after["accounting"]["co2_kg"] == before["accounting"]["co2_kg"]
    assert json.loads((export_dir(back, "c") / "hand_off.json").read_text()) == json.loads(
        (export_dir(tiny_pipeline_dir, "c") / "hand_off.json").read_text()
    )
    for stage in "bc":  # text encoders, pooled projection included
        original = load_file(str(export_dir(tiny_pipeline_dir, stage) / "text_encoder.safetensors"))
        restored = load_file(str(export_dir(back, stage) / "text_encoder.safetensors"))
        assert all(torch.equal(original[k], restored[k]) for k in original)
    original = load_file(str(export_dir(tiny_pipeline_dir, "b") / "compressor.safetensors"))
    restored = load_file(str(export_dir(back, "b") / "compressor.safetensors"))
    assert all(torch.equal(original[k], restored[k]) for k in original)


# ----- the public v2 layout: a decoder repository naming its prior repository ----------------------
@pytest.fixture(scope="module")
def public_layout(diffusers_parts, tmp_path_factory) -> Path:
    p = diffusers_parts
    root = tmp_path_factory.mktemp("public")
    WuerstchenPriorPipeline(
        tokenizer=p["tokenizer"],
        text_encoder=p["text_c"],
        prior=p["prior"],
        scheduler=DDPMWuerstchenScheduler(),
    ).save_pretrained(root / "wuerstchen-prior")
    WuerstchenDecoderPipeline(
        tokenizer=p["tokenizer"],
        text_encoder=p["text_b"],
        decoder=p["decoder"],
        scheduler=DDPMWuerstchenScheduler(),
        vqgan=p["vqgan"],
    ).save_pretrained(root / "wuerstchen")
    # As warp-ai/wuerstchen's model card names warp-ai/wuerstchen-prior (diffusers' connected pipelines).
    (root / "wuerstchen" / "README.md").write_text(
        f"---\nprior:\n- {root / 'wuerstchen-prior'}\n---\n# decoder\n"
    )
    return root


def test_a_decoder_folder_is_imported_with_the_prior_its_model_card_names(
    public_layout, diffusers_parts, tmp_path
):
    out = import_diffusers(public_layout / "wuerstchen", tmp_path / "out")
    prior = load_file(str(export_dir(out, "c") / "model.safetensors"))
    assert all(torch.equal(prior[k], v) for k, v in diffusers_parts["prior"].state_dict().items())
    hand_off = json.loads((out / "pipeline.json").read_text())["hand_off"]
    assert hand_off["latent_mean"] == 42.0 and hand_off["latent_dim_scale"] == 10.67


def test_a_decoder_folder_without_a_prior_asks_for_one(public_layout, tmp_path):
    (public_layout / "wuerstchen" / "README.md").rename(public_layout / "README.bak")
    try:
        with pytest.raises(ValueError, match="without a prior.*pass prior="):
            import_diffusers(public_layout / "wuerstchen", tmp_path / "out")
    finally:
        (public_layout / "README.bak").rename(public_layout / "wuerstchen" / "README.md")
    assert not (tmp_path / "out").exists()


def test_a_prior_folder_alone_is_refused_with_the_command_to_use(public_layout, tmp_path):
    with pytest.raises(ValueError, match="import the decoder folder and pass this one as prior="):
        import_diffusers(public_layout / "wuerstchen-prior", tmp_path / "out")


def test_a_hub_import_fetches_one_copy_of_the_weights_and_no_extras():
    # The listing of a public-style repository: .bin and .safetensors copies, a sample image, an ONNX copy.
    files = [
        ".gitattributes",
        "README.md",
        "model_index.json",
        "sample.png",
        "decoder/config.json",
        "decoder/diffusion_pytorch_model.bin",
        "decoder/diffusion_pytorch_model.safetensors",
        "text_encoder/config.json",
        "text_encoder/pytorch_model.bin",
        "tokenizer/merges.txt",
        "tokenizer/vocab.json",
        "tokenizer/tokenizer_config.json",
        "vqgan/config.json",
        "vqgan/diffusion_pytorch_model.safetensors",
        "onnx/decoder/model.onnx",
    ]
    assert hub_allow_patterns(files) == sorted(
        [
            "README.md",
            "model_index.json",
            "decoder/config.json",
            "decoder/diffusion_pytorch_model.safetensors",
            "text_encoder/config.json",
            "text_encoder/pytorch_model.bin",
            "tokenizer/merges.txt",
            "tokenizer/vocab.json",
            "tokenizer/tokenizer_config.json",
            "vqgan/config.json",
            "vqgan/diffusion_pytorch_model.safetensors",
        ]
    )


def test_a_source_that_is_neither_folder_nor_hub_id_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a local folder nor a Hub repository id"):
        import_diffusers(str(tmp_path / "no" / "such" / "folder"), tmp_path / "out")


def test_a_folder_without_model_index_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        import_diffusers(tmp_path / "empty", tmp_path / "out")


def test_the_import_command_writes_the_pipeline_directory(saved_folder, tmp_path, capsys):
    from wurst.models.hub.cli import main

    assert main(["import", str(saved_folder), f"out={tmp_path / 'pipeline'}"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "pipeline")
    assert (tmp_path / "pipeline" / "stage_c" / "export" / "model.safetensors").is_file()


def test_an_imported_cascade_without_compressor_can_be_exported_again(imported_dir, saved_folder, tmp_path):
    from wurst.models.hub.diffusers_export import export_pipeline

    out = export_pipeline(imported_dir, tmp_path / "again")
    assert not (out / "semantic_compressor").exists()
    assert f"imported from `{saved_folder}`" in (out / "README.md").read_text()
    pipe = WuerstchenCombinedPipeline.from_pretrained(out)
    assert torch.equal(
        pipe.prior_prior.state_dict()["projection.weight"],
        load_file(str(export_dir(imported_dir, "c") / "model.safetensors"))["projection.weight"],
    )


# ----- folders our cascade must run, or refuse at import --------------------------------------------
def _replace_prior(saved_folder: Path, tmp_path: Path, prior: WuerstchenPrior) -> Path:
    folder = tmp_path / "combined"
    shutil.copytree(saved_folder, folder)
    shutil.rmtree(folder / "prior_prior")
    prior.save_pretrained(folder / "prior_prior")
    return folder


def test_a_prior_whose_latents_the_decoder_cannot_take_is_refused_at_import(saved_folder, tmp_path):
    prior = randomise(WuerstchenPrior(c_in=2, c=32, c_cond=64, c_r=64, depth=1, nhead=2), seed=1, std=0.02)
    folder = _replace_prior(saved_folder, tmp_path, prior)
    with pytest.raises(ValueError, match=r"cannot run as one cascade: Stage C samples 2-channel .* effnet_embd=16"):
        import_diffusers(folder, tmp_path / "pipeline")
    assert not (tmp_path / "pipeline").exists()


@pytest.mark.slow
def test_a_decoder_that_injects_no_semantic_latents_imports_and_generates_as_diffusers_does(
    diffusers_parts, tmp_path
):
    """As diffusers' own small test pipelines are built: a 2-channel prior, a decoder with no injection."""
    p = diffusers_parts
    prior = randomise(WuerstchenPrior(c_in=2, c=32, c_cond=64, c_r=64, depth=1, nhead=2), seed=1, std=0.02)
    decoder = randomise(
        WuerstchenDiffNeXt(c_in=4, c_out=4, c_r=64, patch_size=2, c_cond=32, c_hidden=[16, 32], nhead=[-1, 2],
                           blocks=[1, 1], level_config=["CT", "CTA"], inject_effnet=[False, False], effnet_embd=16,
                           clip_embd=64),
        seed=2, std=0.02,
    )
    pipe = WuerstchenCombinedPipeline(
        tokenizer=p["tokenizer"], text_encoder=p["text_b"], decoder=decoder, scheduler=DDPMWuerstchenScheduler(),
        vqgan=p["vqgan"], prior_tokenizer=p["tokenizer"], prior_text_encoder=p["text_c"], prior_prior=prior,
        prior_scheduler=DDPMWuerstchenScheduler(),
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(tmp_path / "folder")
    pipeline_dir = import_diffusers(tmp_path / "folder", tmp_path / "pipeline")
    expected = pipe(PROMPT, height=IMAGE_SIDE, width=IMAGE_SIDE, prior_num_inference_steps=2, num_inference_steps=2,
                    generator=seeded(5), output_type="pt").images
    cascade = our_cascade(pipeline_dir, prior_t_grid="linear", prior_steps=2, decoder_steps=2)
    images = cascade([PROMPT], IMAGE_SIDE, IMAGE_SIDE, generator=seeded(5))
    assert (images - expected).abs().max() < IMAGE_TOLERANCE
