"""Stage A, the f4 VQGAN: paper size, diffusers layout and numerics, the vector quantizer, input errors."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers.pipelines.deprecated.wuerstchen import PaellaVQModel

from wurst.models.diffusers_compat import from_diffusers, to_diffusers
from wurst.models.stage_a import StageA, VectorQuantizer, codebook_usage

# REFERENCE.md "The cascade": v2 Stage A has 18.4 M parameters and is PaellaVQModel() with defaults.
PAPER_PARAMS = 18.4e6

# Two small configs that differ in every dimension (a 3-level f8 variant and a 1-channel f4 one).
SMALL_CONFIGS = [
    {"levels": 2, "bottleneck_blocks": 2, "embed_dim": 32, "latent_channels": 4, "num_vq_embeddings": 64},
    {
        "in_channels": 1, "out_channels": 2, "up_down_scale_factor": 2, "levels": 3, "bottleneck_blocks": 1,
        "embed_dim": 48, "latent_channels": 3, "num_vq_embeddings": 32, "scale_factor": 0.5,
    },
]  # fmt: skip
IDS = ["f4-e32", "f8-e48"]


def _images(model_cfg: dict, batch: int = 2, side: int = 16) -> torch.Tensor:
    return torch.rand(batch, model_cfg.get("in_channels", 3), side, side)


def _pair_from_diffusers(cfg: dict, randomize):
    theirs = randomize(PaellaVQModel(**cfg)).eval()
    return from_diffusers(theirs), theirs


def _pair_from_ours(cfg: dict, randomize):
    ours = randomize(StageA(**cfg), seed=1).eval()
    return ours, to_diffusers(ours)


# --- paper size and layout -------------------------------------------------------------------------


def test_paper_config_has_18_4M_parameters(build_from_conf):
    model = build_from_conf("stage_a", "paper", device="meta")
    n = sum(p.numel() for p in model.parameters())
    print(f"\nStageA paper parameters: {n:,} ({n / 1e6:.2f} M; REFERENCE.md 18.4 M)")
    assert abs(n - PAPER_PARAMS) / PAPER_PARAMS < 0.005


def test_paper_state_dict_keys_and_shapes_equal_paella_vq_model(build_from_conf):
    ours = build_from_conf("stage_a", "paper", device="meta").state_dict()
    with torch.device("meta"):
        theirs = PaellaVQModel().state_dict()
    assert list(ours) == list(theirs)
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    assert ours["vquantizer.embedding.weight"].shape == (8192, 4)


def test_tiny_config_maps_128px_images_to_4x32x32_latents(build_from_conf):
    model = build_from_conf("stage_a", "tiny").eval()
    with torch.no_grad():
        latents = model.encode(torch.rand(1, 3, 128, 128))
        assert latents.shape == (1, 4, 32, 32)
        assert model.decode(latents).shape == (1, 3, 128, 128)


def test_forward_returns_reconstruction_loss_and_indices():
    model = StageA(**SMALL_CONFIGS[0]).eval()
    x = _images(SMALL_CONFIGS[0], side=24)
    reconstruction, vq_loss, indices = model(x)
    assert reconstruction.shape == x.shape
    assert vq_loss.ndim == 0 and vq_loss > 0
    assert indices.shape == (2, 6, 6) and indices.dtype == torch.long


# --- numerical parity with diffusers, both directions ----------------------------------------------


@pytest.mark.parametrize("direction", [_pair_from_diffusers, _pair_from_ours], ids=["from", "to"])
@pytest.mark.parametrize("cfg", SMALL_CONFIGS, ids=IDS)
def test_encode_matches_diffusers(cfg, direction, randomize):
    ours, theirs = direction(cfg, randomize)
    x = _images(cfg)
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(x), theirs.encode(x).latents, atol=1e-5, rtol=0)


@pytest.mark.parametrize("quantize", [False, True], ids=["continuous", "quantized"])
@pytest.mark.parametrize("direction", [_pair_from_diffusers, _pair_from_ours], ids=["from", "to"])
@pytest.mark.parametrize("cfg", SMALL_CONFIGS, ids=IDS)
def test_decode_matches_diffusers(cfg, direction, quantize, randomize):
    ours, theirs = direction(cfg, randomize)
    latents = torch.randn(2, cfg["latent_channels"], 4, 4)
    with torch.no_grad():
        expected = theirs.decode(latents, force_not_quantize=not quantize).sample
        torch.testing.assert_close(ours.decode(latents, quantize=quantize), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("direction", [_pair_from_diffusers, _pair_from_ours], ids=["from", "to"])
@pytest.mark.parametrize("cfg", SMALL_CONFIGS, ids=IDS)
def test_codebook_indices_and_vq_loss_match_diffusers(cfg, direction, randomize):
    ours, theirs = direction(cfg, randomize)
    latents = torch.randn(2, cfg["latent_channels"], 5, 3)
    with torch.no_grad():
        quantized, vq_loss, indices = ours.quantize(latents)
        their_quantized, their_loss, (_, _, their_indices) = theirs.vquantizer(latents)
    assert torch.equal(indices.flatten(), their_indices)
    torch.testing.assert_close(quantized, their_quantized, atol=1e-5, rtol=0)
    torch.testing.assert_close(vq_loss, their_loss, atol=1e-6, rtol=1e-6)


# --- the vector quantizer --------------------------------------------------------------------------


def test_quantized_values_are_codebook_rows():
    vq = VectorQuantizer(num_vq_embeddings=16, latent_channels=4)
    quantized, _, indices = vq(torch.randn(2, 4, 3, 5))
    rows = quantized.permute(0, 2, 3, 1).reshape(-1, 4)
    torch.testing.assert_close(rows, vq.embedding.weight[indices.flatten()])


def test_each_latent_snaps_to_its_nearest_code():
    vq = VectorQuantizer(num_vq_embeddings=16, latent_channels=4)
    z = torch.randn(1, 4, 2, 2)
    _, _, indices = vq(z)
    distances = ((z.permute(0, 2, 3, 1).reshape(-1, 1, 4) - vq.embedding.weight[None]) ** 2).sum(-1)
    assert torch.equal(indices.flatten(), distances.argmin(dim=1))


def test_straight_through_gradient_reaches_the_encoder():
    model = StageA(**SMALL_CONFIGS[0])
    reconstruction, _, _ = model(_images(SMALL_CONFIGS[0]))
    reconstruction.mean().backward()  # no vq_loss: only the straight-through path can carry a gradient
    encoder_grad = model.in_block[1].weight.grad
    assert encoder_grad is not None and encoder_grad.abs().sum() > 0
    assert (
        model.vquantizer.embedding.weight.grad is None
        or model.vquantizer.embedding.weight.grad.abs().sum() == 0
    )


def test_vq_loss_is_codebook_term_plus_beta_times_commitment_term():
    vq = VectorQuantizer(num_vq_embeddings=8, latent_channels=4, beta=0.25)
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    _, vq_loss, indices = vq(z)
    q = vq.embedding.weight[indices].permute(0, 3, 1, 2).detach()
    torch.testing.assert_close(vq_loss, 1.25 * ((q - z) ** 2).mean())
    vq_loss.backward()
    # The commitment term (weight beta) alone moves z; the codebook term (weight 1) alone moves the codes.
    torch.testing.assert_close(z.grad, 0.25 * 2 * (z - q).detach() / z.numel())
    code_grad = torch.zeros_like(vq.embedding.weight).index_add_(
        0, indices.flatten(), (2 * (q - z).detach() / z.numel()).permute(0, 2, 3, 1).reshape(-1, 4)
    )
    torch.testing.assert_close(vq.embedding.weight.grad, code_grad)


def test_vq_loss_is_positive_and_decreases_as_latents_move_toward_their_codes():
    vq = VectorQuantizer(num_vq_embeddings=32, latent_channels=4)
    z = torch.randn(2, 4, 4, 4)
    with torch.no_grad():
        codes, loss_far, _ = vq(z)
        _, loss_near, _ = vq(z + 0.5 * (codes - z))
    assert loss_far > 0 and 0 < loss_near < loss_far


def test_codebook_usage_of_uniform_use_is_the_number_of_codes_used():
    indices = torch.tensor([[0, 1], [2, 3]]).repeat(3, 1, 1)  # codes 0..3 used equally, 4..7 never
    perplexity, dead_fraction = codebook_usage(indices, num_vq_embeddings=8)
    assert math.isclose(perplexity.item(), 4.0, rel_tol=1e-6)
    assert dead_fraction.item() == 0.5


def test_codebook_usage_of_a_single_code_is_one():
    model = StageA(**SMALL_CONFIGS[1])
    perplexity, dead_fraction = model.codebook_usage(torch.full((2, 3, 3), 5))
    assert math.isclose(perplexity.item(), 1.0, rel_tol=1e-6)
    assert math.isclose(dead_fraction.item(), 31 / 32)


def test_codebook_usage_rejects_indices_outside_the_codebook():
    with pytest.raises(ValueError, match=r"integers in \[0, 8\).*range \[0, 8\]"):
        codebook_usage(torch.tensor([0, 8]), num_vq_embeddings=8)


# --- bad inputs ------------------------------------------------------------------------------------


def test_image_side_not_divisible_by_4_is_rejected():
    model = StageA(**SMALL_CONFIGS[0])
    with pytest.raises(ValueError, match=r"size 18×16; height and width must be divisible by 4"):
        model.encode(torch.rand(1, 3, 18, 16))


def test_image_with_wrong_channel_count_is_rejected():
    model = StageA(**SMALL_CONFIGS[0])
    with pytest.raises(ValueError, match=r"shape \(1, 4, 16, 16\); expected \[B, 3, H, W\]"):
        model.encode(torch.rand(1, 4, 16, 16))


def test_latents_with_wrong_channel_count_are_rejected():
    model = StageA(**SMALL_CONFIGS[0])
    with pytest.raises(
        ValueError, match=r"StageA.decode got latents of shape \(1, 16, 4, 4\); expected \[B, 4, h, w\]"
    ):
        model.decode(torch.randn(1, 16, 4, 4))


def test_fresh_codebook_matches_the_unit_scale_of_batchnormed_latents():
    codes = StageA(num_vq_embeddings=4096, embed_dim=16, bottleneck_blocks=1).vquantizer.embedding.weight
    assert abs(codes.mean().item()) < 0.05 and abs(codes.std().item() - 1) < 0.05
