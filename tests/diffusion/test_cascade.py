"""Specification of the cascade sampler (captions → Stage C → Stage B → Stage A → images)."""

import inspect
import warnings
from pathlib import Path

import pytest
import torch
from diffusers import WuerstchenCombinedPipeline
from diffusers.pipelines.deprecated.wuerstchen import WuerstchenPrior
from diffusers.pipelines.deprecated.wuerstchen.pipeline_wuerstchen_prior import DEFAULT_STAGE_C_TIMESTEPS
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from wurst.models.cascade import CascadeSampler
from wurst.models.samplers import resolve_t_grid

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
IMAGE_SIDE = 128  # the tiny cascade's image side: Stage C latent 16×3×3, Stage B latent 4×32×32


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def sampler_config(name: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose(config_name=None, overrides=[f"+sampler={name}"]).sampler


# ----- what comes out ----------------------------------------------------------------------------
def test_cascade_returns_images_of_the_asked_size_in_0_1(make_cascade):
    images = make_cascade()(["the cat", "a dog"], IMAGE_SIDE, IMAGE_SIDE, generator=seeded())
    assert images.shape == (2, 3, IMAGE_SIDE, IMAGE_SIDE)
    assert images.min() >= 0 and images.max() <= 1
    assert images.std() > 0  # not a constant (or fully clamped) picture


@pytest.fixture(scope="module")
def cat_images(make_cascade) -> torch.Tensor:
    """One reference run: "the cat" with seed 3, default tiny settings."""
    return make_cascade()(["the cat"], IMAGE_SIDE, IMAGE_SIDE, generator=seeded(3))


def test_cascade_is_deterministic_for_a_fixed_generator(make_cascade, cat_images):
    again = make_cascade()(["the cat"], IMAGE_SIDE, IMAGE_SIDE, generator=seeded(3))
    assert torch.equal(again, cat_images)


def test_cascade_draws_different_images_for_different_seeds(make_cascade, cat_images):
    other_seed = make_cascade()(["the cat"], IMAGE_SIDE, IMAGE_SIDE, generator=seeded(4))
    assert not torch.allclose(other_seed, cat_images)


def test_cascade_images_depend_on_the_prompt(make_cascade, cat_images):
    dog = make_cascade()(["a dog"], IMAGE_SIDE, IMAGE_SIDE, generator=seeded(3))
    assert not torch.allclose(dog, cat_images)


def test_cascade_is_its_prior_half_then_its_decoder_half(make_cascade):
    cascade = make_cascade()
    whole = cascade(["the cat"], IMAGE_SIDE, IMAGE_SIDE, generator=seeded(5))
    generator = seeded(5)
    z = cascade.sample_prior(["the cat"], IMAGE_SIDE, IMAGE_SIDE, generator=generator)
    assert z.shape == (1, 16, 3, 3)  # ceil(128 / 42.67) = 3
    assert torch.equal(cascade.sample_decoder(z, ["the cat"], generator=generator), whole)


def test_latent_sizes_follow_the_v2_hand_off(make_cascade):
    # Stage C side ceil(side / 42.67); Stage B side int(Stage C side · 10.67).
    assert make_cascade().latent_sizes(128, 256) == ((3, 6), (32, 64))


def test_images_of_each_prompt_are_consecutive_and_conditioned_on_it(make_cascade, tiny_diffusers_stages):
    prior = tiny_diffusers_stages["prior"]
    seen = []
    hook = prior.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["c"]), with_kwargs=True
    )
    try:
        images = make_cascade()(
            ["the cat", "a dog"], IMAGE_SIDE, IMAGE_SIDE, generator=seeded(), num_images_per_prompt=2
        )
    finally:
        hook.remove()
    assert images.shape[0] == 4
    text = seen[0]  # [cond (4); uncond (4)]
    assert text.shape[0] == 8
    assert (
        torch.equal(text[0], text[1]) and torch.equal(text[2], text[3]) and not torch.equal(text[1], text[2])
    )
    assert torch.equal(text[4], text[7])  # the unconditional half is the empty caption throughout


def test_sampling_runs_in_eval_mode_and_restores_training_mode(make_cascade, tiny_diffusers_stages):
    prior = tiny_diffusers_stages["prior"]  # has dropout 0.1: train mode would randomise ε
    cascade = make_cascade()
    reference = cascade(["the cat"], IMAGE_SIDE, IMAGE_SIDE, generator=seeded(6))
    prior.train()
    try:
        again = cascade(["the cat"], IMAGE_SIDE, IMAGE_SIDE, generator=seeded(6))
        assert prior.training and all(m.training for m in prior.modules())
    finally:
        prior.eval()
    assert torch.equal(reference, again)


def test_a_size_off_the_128_grid_comes_back_at_the_cascade_size_with_a_warning(make_cascade):
    with pytest.warns(UserWarning, match=r"produced \(128, 128\) images for a requested \(100, 100\)"):
        images = make_cascade()(["the cat"], 100, 100, generator=seeded())
    assert images.shape[-2:] == (128, 128)


# ----- exactness against the public v2 pipelines -------------------------------------------------
@pytest.mark.slow
def test_cascade_equals_diffusers_prior_and_decoder_pipelines_bit_for_bit(make_cascade, diffusers_pipelines):
    prior_pipe, decoder_pipe = diffusers_pipelines
    cascade = make_cascade(prior_t_grid="v2", prior_steps=None, decoder_steps=12, decoder_guidance_scale=4.0)
    generator = seeded(11)
    image_embeddings = prior_pipe(
        "the cat",
        height=IMAGE_SIDE,
        width=IMAGE_SIDE,
        timesteps=DEFAULT_STAGE_C_TIMESTEPS,
        guidance_scale=4.0,
        num_images_per_prompt=2,
        generator=generator,
    ).image_embeddings
    expected = decoder_pipe(
        image_embeddings,
        "the cat",
        num_inference_steps=12,
        guidance_scale=4.0,
        generator=generator,
        output_type="pt",
    ).images

    ours = cascade(["the cat"], IMAGE_SIDE, IMAGE_SIDE, generator=seeded(11), num_images_per_prompt=2)
    assert torch.equal(ours, expected)
    assert 0 < expected.mean() < 1 and ((expected == 0) | (expected == 1)).float().mean() < 0.1


def test_cascade_equals_diffusers_with_an_unguided_decoder_and_a_negative_prompt(
    make_cascade, diffusers_pipelines
):
    # Diffusers' decoder default w = 0 means "no guidance" (a single conditional pass), not ε_uncond.
    prior_pipe, decoder_pipe = diffusers_pipelines
    cascade = make_cascade(decoder_guidance_scale=0.0)
    generator = seeded(12)
    image_embeddings = prior_pipe(
        "the cat",
        height=IMAGE_SIDE,
        width=IMAGE_SIDE,
        num_inference_steps=3,
        guidance_scale=4.0,
        negative_prompt="a dog",
        generator=generator,
    ).image_embeddings
    expected = decoder_pipe(
        image_embeddings,
        "the cat",
        num_inference_steps=2,
        guidance_scale=0.0,
        generator=generator,
        output_type="pt",
    ).images

    ours = cascade(["the cat"], IMAGE_SIDE, IMAGE_SIDE, generator=seeded(12), negative_prompts="a dog")
    assert torch.equal(ours, expected)


# ----- clear errors ------------------------------------------------------------------------------
def test_cascade_refuses_an_empty_prompt_list(make_cascade):
    with pytest.raises(ValueError, match="prompts must be a non-empty list of captions"):
        make_cascade()([], IMAGE_SIDE, IMAGE_SIDE)


def test_cascade_refuses_prompts_that_are_not_strings(make_cascade):
    with pytest.raises(TypeError, match="every prompt must be a str, got int"):
        make_cascade()(["the cat", 3], IMAGE_SIDE, IMAGE_SIDE)


def test_cascade_refuses_an_image_too_small_for_stage_b(make_cascade):
    # 40 px → Stage C side 1 → Stage B side 10, not a multiple of patch 2 × 2^(2 − 1) = 4.
    with pytest.raises(ValueError, match=r"height=40 is too small.*multiple of 4.*use height=128"):
        make_cascade()(["the cat"], 40, IMAGE_SIDE)


def test_cascade_refuses_text_states_narrower_than_stage_c_expects(make_cascade, make_text_encoder):
    cascade = make_cascade()
    cascade.text_encoder_c = make_text_encoder(seed=6, width=32)
    with pytest.raises(
        ValueError, match="text_encoder_c returns 32-wide text states but stage_c's c_cond is 64"
    ):
        cascade(["the cat"], IMAGE_SIDE, IMAGE_SIDE)


def test_cascade_refuses_text_states_narrower_than_stage_b_expects(make_cascade, make_text_encoder):
    cascade = make_cascade()
    cascade.text_encoder_b = make_text_encoder(seed=6, width=32)
    z = torch.zeros(1, 16, 3, 3)
    with pytest.raises(
        ValueError, match="text_encoder_b returns 32-wide text states but stage_b's clip_embd is 64"
    ):
        cascade.sample_decoder(z, ["the cat"])


def test_cascade_refuses_stages_with_different_semantic_widths(tiny_diffusers_stages, make_text_encoder):
    s = tiny_diffusers_stages
    text = make_text_encoder(seed=4)
    with pytest.raises(
        ValueError, match="stage_c samples 8-channel semantic latents but stage_b's effnet mappers"
    ):
        CascadeSampler(
            WuerstchenPrior(c_in=8, c=32, c_cond=64, depth=1, nhead=2), s["decoder"], s["vqgan"], text, text
        )


def test_cascade_refuses_semantic_latents_not_grouped_by_prompt(make_cascade):
    with pytest.raises(ValueError, match="not a multiple of the 2 prompts"):
        make_cascade().sample_decoder(torch.zeros(3, 16, 3, 3), ["the cat", "a dog"])


# ----- configs -----------------------------------------------------------------------------------
def test_paper_sampler_config_is_the_v2_recipe(tiny_diffusers_stages, make_text_encoder):
    s = tiny_diffusers_stages
    text = make_text_encoder(seed=4)
    cascade = instantiate(sampler_config("paper"))(
        stage_c=s["prior"], stage_b=s["decoder"], stage_a=s["vqgan"], text_encoder_c=text, text_encoder_b=text
    )
    assert (cascade.prior_t_grid, cascade.prior_guidance_scale) == ("v2", 4.0)
    assert (cascade.decoder_steps, cascade.decoder_guidance_scale) == (12, 0.0)
    hand_off = (
        cascade.latent_mean,
        cascade.latent_std,
        cascade.resolution_multiple,
        cascade.latent_dim_scale,
    )
    assert hand_off == (42.0, 1.0, 42.67, 10.67)
    assert cascade.vqgan_scale_factor == pytest.approx(0.3764)  # read from Stage A


def test_the_paper_sampler_is_the_released_call_of_diffusers_combined_pipeline():
    """The model card's call: Stage C on DEFAULT_STAGE_C_TIMESTEPS at the pipeline's prior guidance, Stage B
    with the pipeline's own default steps and guidance (0: unguided)."""
    defaults = {k: v.default for k, v in inspect.signature(WuerstchenCombinedPipeline.__call__).parameters.items()}
    config = sampler_config("paper")
    assert config["decoder_guidance_scale"] == defaults["decoder_guidance_scale"] == 0.0
    assert config["decoder_steps"] == defaults["num_inference_steps"]
    assert config["prior_guidance_scale"] == defaults["prior_guidance_scale"]
    grid = resolve_t_grid(config["prior_t_grid"], config["prior_steps"])
    assert [float(t) for t in grid] == pytest.approx([float(t) for t in DEFAULT_STAGE_C_TIMESTEPS])


def test_the_v1_sampler_is_the_v1_papers():
    config = sampler_config("v1")
    assert (config["prior_t_grid"], config["prior_steps"], config["prior_guidance_scale"]) == ("linear", 60, 4.0)
    assert (config["decoder_steps"], config["decoder_guidance_scale"]) == (12, 4.0)


@pytest.mark.slow
def test_tiny_cascade_of_our_own_stages_from_the_tiny_configs():
    """StageC/StageB/StageA/TextEncoder built from conf/model/*/tiny.yaml, sampled with conf/sampler/tiny.yaml."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose(
            config_name=None,
            overrides=[
                "+sampler=tiny",
                "+model/stage_a=tiny",
                "+model/stage_b=tiny",
                "+model/stage_c=tiny",
                "+model/text_encoder@model.text_encoder=tiny",
            ],
        )
    torch.manual_seed(0)
    stages = {
        name: instantiate(cfg.model[name]) for name in ("stage_a", "stage_b", "stage_c", "text_encoder")
    }
    cascade = instantiate(cfg.sampler)(
        stage_c=stages["stage_c"],
        stage_b=stages["stage_b"],
        stage_a=stages["stage_a"],
        text_encoder_c=stages["text_encoder"],
        text_encoder_b=stages["text_encoder"],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 128 px is on the cascade's grid: no size warning
        first = cascade(["a red circle"], IMAGE_SIDE, IMAGE_SIDE, generator=seeded(7))
    second = cascade(["a red circle"], IMAGE_SIDE, IMAGE_SIDE, generator=seeded(7))
    assert first.shape == (1, 3, IMAGE_SIDE, IMAGE_SIDE)
    assert first.min() >= 0 and first.max() <= 1
    assert torch.equal(first, second)
