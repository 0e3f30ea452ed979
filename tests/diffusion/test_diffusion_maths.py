"""Specification of the diffusion maths (REFERENCE.md "Diffusion, as the official code does it")."""

import math

import pytest
import torch
from diffusers import DDPMWuerstchenScheduler

from wurst.models.diffusion import (
    add_noise,
    cosine_alpha_cumprod,
    diffusion_loss,
    p2_weight,
    sample_training_t,
)


def hand_alpha_cumprod(t: float, s: float = 0.008) -> float:
    """ᾱ(t) written out from REFERENCE.md in float64, before the clamp."""
    return math.cos((t + s) / (1 + s) * math.pi / 2) ** 2 / math.cos(s / (1 + s) * math.pi / 2) ** 2


def test_alpha_cumprod_at_zero_is_clamped_to_0_9999():
    assert hand_alpha_cumprod(0.0) == pytest.approx(1.0)  # unclamped value
    assert cosine_alpha_cumprod(0.0).item() == pytest.approx(0.9999, abs=1e-7)


def test_alpha_cumprod_at_half_matches_the_formula():
    assert hand_alpha_cumprod(0.5) == pytest.approx(0.4938436, abs=1e-7)
    assert cosine_alpha_cumprod(0.5).item() == pytest.approx(hand_alpha_cumprod(0.5), abs=1e-6)


def test_alpha_cumprod_at_one_is_clamped_to_1e_4():
    assert hand_alpha_cumprod(1.0) < 1e-4  # cos² of just over π/2: the clamp matters
    assert cosine_alpha_cumprod(1.0).item() == pytest.approx(1e-4, rel=1e-5)


def test_alpha_cumprod_decreases_monotonically_in_t():
    alpha_cumprod = cosine_alpha_cumprod(torch.linspace(0, 1, 1001))
    assert bool((alpha_cumprod[1:] <= alpha_cumprod[:-1]).all())


def test_alpha_cumprod_equals_diffusers_wuerstchen_scheduler_bit_for_bit():
    t = torch.rand(4096, generator=torch.Generator().manual_seed(0))
    expected = DDPMWuerstchenScheduler()._alpha_cumprod(t, "cpu")
    assert torch.equal(cosine_alpha_cumprod(t), expected)


def test_alpha_cumprod_of_half_precision_times_is_float32():
    assert cosine_alpha_cumprod(torch.tensor([0.25], dtype=torch.bfloat16)).dtype == torch.float32


def test_add_noise_has_the_schedules_mean_and_variance():
    x0 = torch.full((200_000,), 2.0)
    t = torch.tensor(0.3)
    x_t = add_noise(x0[None], t, torch.randn(1, 200_000))
    alpha_cumprod = hand_alpha_cumprod(0.3)
    assert x_t.mean().item() == pytest.approx(math.sqrt(alpha_cumprod) * 2.0, abs=0.01)
    assert x_t.var().item() == pytest.approx(1 - alpha_cumprod, abs=0.01)


def test_add_noise_uses_one_time_per_sample():
    x0, noise = torch.ones(2, 1, 2, 2), torch.zeros(2, 1, 2, 2)
    x_t = add_noise(x0, torch.tensor([0.0, 1.0]), noise)
    assert x_t[0].flatten().tolist() == pytest.approx([math.sqrt(0.9999)] * 4)
    assert x_t[1].flatten().tolist() == pytest.approx([0.01] * 4)


def test_add_noise_keeps_the_input_dtype():
    x0 = torch.randn(2, 4, 3, 3, dtype=torch.bfloat16)
    assert add_noise(x0, torch.rand(2), torch.randn_like(x0)).dtype == torch.bfloat16


def test_add_noise_rejects_noise_of_another_shape():
    with pytest.raises(ValueError, match="noise must have x0's shape"):
        add_noise(torch.zeros(2, 4, 8, 8), torch.rand(2), torch.zeros(2, 4, 8, 7))


def test_add_noise_rejects_a_time_per_sample_of_the_wrong_length():
    with pytest.raises(ValueError, match="one time per sample"):
        add_noise(torch.zeros(2, 4, 8, 8), torch.rand(3), torch.zeros(2, 4, 8, 8))


def test_training_times_lie_in_0_001_to_1():
    t = sample_training_t(100_000, generator=torch.Generator().manual_seed(0))
    assert t.shape == (100_000,) and t.dtype == torch.float32
    assert t.min().item() >= 0.001 and t.max().item() <= 1.0


def test_training_times_put_the_stretch_overflow_on_t_equal_1():
    # t = (1 − u)·1.08 + 0.001 ≥ 1 ⇔ u ≤ 0.081/1.08 = 0.075: that share of the draws clamps to 1.
    t = sample_training_t(200_000, generator=torch.Generator().manual_seed(1))
    assert (t == 1.0).float().mean().item() == pytest.approx(0.0750, abs=0.003)
    # Below the clamp t is uniform on [0.001, 1): a quarter of the unclamped mass lies under 0.25.
    unclamped = t[t < 1.0]
    assert (unclamped < 0.25).float().mean().item() == pytest.approx(0.249 / 0.999, abs=0.005)
    # The lower end is reached (u → 1 gives t → 0.001): the whole range gets trained.
    assert unclamped.min().item() < 0.002


def test_training_times_are_reproducible_with_a_generator():
    first = sample_training_t(8, generator=torch.Generator().manual_seed(3))
    second = sample_training_t(8, generator=torch.Generator().manual_seed(3))
    assert torch.equal(first, second)


def test_training_times_need_a_positive_batch_size():
    with pytest.raises(ValueError, match="batch_size"):
        sample_training_t(0)


def test_p2_weight_with_k_and_gamma_1_is_one_minus_alpha_cumprod():
    t = torch.tensor([0.0, 0.5, 1.0])
    weights = p2_weight(t)
    assert weights.tolist() == pytest.approx([1e-4, 1 - hand_alpha_cumprod(0.5), 0.9999], abs=1e-6)


def test_p2_weight_follows_k_and_gamma():
    ratio = hand_alpha_cumprod(0.5) / (1 - hand_alpha_cumprod(0.5))
    assert p2_weight(0.5, k=2.0, gamma=0.5).item() == pytest.approx((2 + ratio) ** -0.5, rel=1e-5)


def test_diffusion_loss_is_p2_weighted_per_sample_mse():
    eps = torch.zeros(2, 4, 3, 3)
    eps_pred = torch.stack([torch.full((4, 3, 3), 1.0), torch.full((4, 3, 3), 2.0)])  # MSE 1 and 4
    t = torch.tensor([0.5, 1.0])
    loss, per_sample = diffusion_loss(eps_pred, eps, t)
    expected = [1.0 * (1 - hand_alpha_cumprod(0.5)), 4.0 * 0.9999]
    assert per_sample.tolist() == pytest.approx(expected, rel=1e-5)
    assert loss.item() == pytest.approx(sum(expected) / 2, rel=1e-5)


def test_diffusion_loss_backpropagates_into_the_prediction():
    eps_pred = torch.randn(3, 4, 2, 2, requires_grad=True)
    loss, _ = diffusion_loss(eps_pred, torch.randn(3, 4, 2, 2), torch.rand(3))
    loss.backward()
    assert eps_pred.grad is not None and eps_pred.grad.abs().sum() > 0


def test_diffusion_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape"):
        diffusion_loss(torch.zeros(2, 4, 8, 8), torch.zeros(2, 4, 4, 4), torch.rand(2))


def test_diffusion_loss_rejects_times_not_one_per_sample():
    with pytest.raises(ValueError, match="one time per sample"):
        diffusion_loss(torch.zeros(2, 4, 8, 8), torch.zeros(2, 4, 8, 8), torch.rand(()))
