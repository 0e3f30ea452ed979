"""Stage B (DiffNeXt): the v2 layout, parity with diffusers' WuerstchenDiffNeXt, input checks."""

from __future__ import annotations

import pytest
import torch
from diffusers.pipelines.deprecated.wuerstchen.modeling_wuerstchen_diffnext import WuerstchenDiffNeXt
from hydra.utils import instantiate

from wurst.models.stage_b import StageB

# Two deliberately different small DiffNeXt shapes for the diffusers parity checks.
TINY_STAGE_B = {
    "c_hidden": [32, 64],
    "nhead": [-1, 2],
    "blocks": [1, 1],
    "level_config": ["CT", "CTA"],
    "inject_effnet": [False, True],
    "effnet_embd": 16,
    "clip_embd": 64,
    "c_cond": 64,
}
ODD_STAGE_B = {
    "c_in": 3,
    "c_out": 3,
    "c_r": 33,
    "patch_size": 1,
    "c_cond": 24,
    "c_hidden": [16, 24, 32],
    "nhead": [2, -1, 4],
    "blocks": [2, 1, 2],
    "level_config": ["TCA", "C", "ACT"],
    "inject_effnet": [True, False, True],
    "effnet_embd": 8,
    "clip_embd": 40,
    "kernel_size": 5,
    "dropout": [0.0, 0.2, 0.1],
}
PAPER_PARAMS = 1_055.4e6  # REFERENCE.md "The cascade"
# REFERENCE.md's WuerstchenDiffNeXt arguments for the v2 decoder.
PAPER_DIFFNEXT = {
    "c_hidden": [320, 640, 1280, 1280],
    "nhead": [-1, 10, 20, 20],
    "blocks": [4, 4, 14, 4],
    "level_config": ["CT", "CTA", "CTA", "CTA"],
    "inject_effnet": [False, True, True, True],
    "effnet_embd": 16,
    "clip_embd": 1024,
    "c_cond": 1024,
    "c_r": 64,
    "patch_size": 2,
}


def _inputs(cfg: dict, batch: int = 2, side: int = 16, effnet_side: int = 3, tokens: int = 5):
    g = torch.Generator().manual_seed(7)
    return (
        torch.randn(batch, cfg.get("c_in", 4), side, side + cfg.get("patch_size", 2) * 4, generator=g),
        torch.rand(batch, generator=g),
        torch.randn(batch, cfg.get("effnet_embd", 16), effnet_side, effnet_side + 1, generator=g),
        torch.randn(batch, tokens, cfg.get("clip_embd", 1024), generator=g),
    )


@pytest.mark.slow  # diffusers' weight init is quadratic in the module count (~9 s on meta)
def test_paper_config_has_the_v2_parameter_count_and_diffusers_state_dict(model_conf):
    with torch.device("meta"):
        ours = instantiate(model_conf("stage_b", "paper"))
        reference = WuerstchenDiffNeXt(**PAPER_DIFFNEXT)
    n_params = sum(p.numel() for p in ours.parameters())
    print(f"paper StageB parameters: {n_params / 1e6:.2f} M")
    assert abs(n_params - PAPER_PARAMS) / PAPER_PARAMS < 0.005
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    reference_shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    assert ours_shapes == reference_shapes


@pytest.mark.parametrize("cfg", [TINY_STAGE_B, ODD_STAGE_B], ids=["tiny", "odd"])
def test_diffusers_weights_load_into_stage_b_and_give_the_same_noise_prediction(cfg, randomise):
    reference = randomise(WuerstchenDiffNeXt(**cfg)).eval()
    ours = StageB(**cfg).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    x, r, effnet, clip = _inputs(cfg)
    with torch.no_grad():
        expected, got = reference(x, r, effnet, clip), ours(x, r, effnet, clip)
    assert got.shape == x.shape
    assert expected.abs().max() > 0.1  # a non-trivial prediction, not two zero tensors
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cfg", [TINY_STAGE_B, ODD_STAGE_B], ids=["tiny", "odd"])
def test_stage_b_weights_load_into_diffusers_and_give_the_same_noise_prediction(cfg, randomise):
    ours = randomise(StageB(**cfg), seed=2).eval()
    reference = WuerstchenDiffNeXt(**cfg).eval()
    reference.load_state_dict(ours.state_dict(), strict=True)
    x, r, effnet, clip = _inputs(cfg, batch=3, side=8, effnet_side=2, tokens=4)
    with torch.no_grad():
        torch.testing.assert_close(
            ours(x, r, effnet, clip), reference(x, r, effnet, clip), rtol=1e-5, atol=1e-5
        )


def test_a_stage_b_that_injects_no_semantic_latents_runs_on_any_channels_like_diffusers(randomise):
    """diffusers' own small test pipelines pair inject_effnet=[False] decoders with 2-channel priors: the
    latents are never read, so diffusers runs them; a folder like that must generate here too."""
    cfg = {**TINY_STAGE_B, "inject_effnet": [False, False]}
    reference = randomise(WuerstchenDiffNeXt(**cfg)).eval()
    ours = StageB(**cfg).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    x, r, _, clip = _inputs(cfg)
    two_channels = torch.randn(x.shape[0], 2, 3, 3)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, r, two_channels, clip), reference(x, r, two_channels, clip))


def test_fresh_stage_b_starts_with_a_zero_output_conv_so_it_predicts_twice_the_input():
    # Official init: clf conv weights zero → a = 0, b = sigmoid(0)·(1 − 2e-3) + 1e-3 = 0.5.
    model = StageB(**TINY_STAGE_B).eval()
    x, r, effnet, clip = _inputs(TINY_STAGE_B)
    with torch.no_grad():
        torch.testing.assert_close(model(x, r, effnet, clip), x / 0.5)


def test_gradient_checkpointing_gives_the_same_output_and_gradients(randomise):
    cfg = {**TINY_STAGE_B, "dropout": 0.0}
    plain = randomise(StageB(**cfg)).train()
    checkpointed = randomise(StageB(**cfg, gradient_checkpointing=True)).train()
    x, r, effnet, clip = _inputs(cfg)
    out_plain, out_ckpt = plain(x, r, effnet, clip), checkpointed(x, r, effnet, clip)
    out_plain.square().mean().backward()
    out_ckpt.square().mean().backward()
    torch.testing.assert_close(out_ckpt, out_plain)
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=name)


def test_effnet_of_any_size_is_resized_to_every_level():
    model = StageB(**TINY_STAGE_B).eval()
    x, r, _, clip = _inputs(TINY_STAGE_B)
    for side in (1, 3, 40):
        assert model(x, r, torch.randn(2, 16, side, side), clip).shape == x.shape


def test_config_records_constructor_arguments_as_plain_values():
    model = StageB(**TINY_STAGE_B)
    rebuilt = StageB(**model.config)
    assert model.config["c_hidden"] == [32, 64] and model.config["inject_effnet"] == [False, True]
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in model.state_dict().items()
    }


@pytest.fixture(scope="module")
def tiny_stage_b():
    return StageB(**TINY_STAGE_B).eval()


def test_rejects_latents_with_the_wrong_channel_count(tiny_stage_b):
    _x, r, effnet, clip = _inputs(TINY_STAGE_B)
    with pytest.raises(ValueError, match=r"latents x must be \[B, c_in=4, H, W\]"):
        tiny_stage_b(torch.randn(2, 3, 16, 24), r, effnet, clip)


def test_rejects_latent_sides_not_divisible_by_the_patching(tiny_stage_b):
    _x, r, effnet, clip = _inputs(TINY_STAGE_B)
    with pytest.raises(ValueError, match=r"divisible by patch_size·2\^\(levels−1\) = 4"):
        tiny_stage_b(torch.randn(2, 4, 16, 18), r, effnet, clip)


def test_rejects_effnet_with_the_wrong_channel_count(tiny_stage_b):
    x, r, _effnet, clip = _inputs(TINY_STAGE_B)
    with pytest.raises(ValueError, match=r"effnet must be \[B=2, effnet_embd=16, h, w\]"):
        tiny_stage_b(x, r, torch.randn(2, 8, 3, 3), clip)


def test_rejects_clip_of_the_wrong_width(tiny_stage_b):
    x, r, effnet, _clip = _inputs(TINY_STAGE_B)
    with pytest.raises(ValueError, match=r"clip must be \[B=2, L, clip_embd=64\]"):
        tiny_stage_b(x, r, effnet, torch.randn(2, 5, 1024))


def test_rejects_missing_clip_when_the_network_attends_to_text(tiny_stage_b):
    x, r, effnet, _ = _inputs(TINY_STAGE_B)
    with pytest.raises(ValueError, match="clip is None"):
        tiny_stage_b(x, r, effnet, None)


def test_network_without_attention_runs_without_clip():
    cfg = {**TINY_STAGE_B, "level_config": ["CT", "CT"]}
    x, r, effnet, _ = _inputs(cfg)
    assert StageB(**cfg).eval()(x, r, effnet).shape == x.shape


def test_rejects_per_level_lists_of_different_lengths():
    with pytest.raises(ValueError, match="blocks has 3 entries but c_hidden has 2 levels"):
        StageB(**{**TINY_STAGE_B, "blocks": [1, 1, 1]})


def test_rejects_unknown_block_letters():
    with pytest.raises(ValueError, match=r"level_config\[1\]='CTX'"):
        StageB(**{**TINY_STAGE_B, "level_config": ["CT", "CTX"]})


def test_tiny_configs_fit_together_and_train_the_compressor_jointly(model_conf, tiny_text_encoder):
    # The tiny cascade's shapes: 128-px images → Stage A latent 4×32×32; compressor at 96 px → 16×3×3.
    stage_b = instantiate(model_conf("stage_b", "tiny")).train()
    compressor = instantiate(model_conf("compressor", "tiny")).train()
    hidden, _ = tiny_text_encoder(["a sausage", ""])
    latents, images = torch.randn(2, 4, 32, 32), torch.rand(2, 3, 96, 96)
    eps = stage_b(latents, torch.rand(2), compressor(images), hidden)
    assert eps.shape == latents.shape
    eps.square().mean().backward()
    assert all(p.grad is not None for p in compressor.parameters())
