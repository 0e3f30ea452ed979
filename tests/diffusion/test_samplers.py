"""Specification of the samplers: steps, t grids, classifier-free guidance, the sampling loop."""

import math

import pytest
import torch
from diffusers import DDPMWuerstchenScheduler
from diffusers.pipelines.deprecated.wuerstchen.pipeline_wuerstchen_prior import DEFAULT_STAGE_C_TIMESTEPS

from wurst.models.diffusion import add_noise, cosine_alpha_cumprod
from wurst.models.samplers import (
    cfg_eps,
    ddim_step,
    ddpm_step,
    draw_noise,
    linear_t_grid,
    resolve_t_grid,
    sample,
    v2_stage_c_t_grid,
)


@pytest.fixture
def noised():
    """x0, the true noise and x_t at t = 0.5 for a batch of 2 [2, 4, 8, 8]."""
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 4, 8, 8, generator=generator)
    eps = torch.randn(2, 4, 8, 8, generator=generator)
    return x0, eps, add_noise(x0, torch.full((2,), 0.5), eps)


def oracle(x0: torch.Tensor):
    """A model that knows x0: it returns the exact noise that takes x0 to x at time r."""

    def model_fn(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        alpha_cumprod = cosine_alpha_cumprod(r).view(-1, 1, 1, 1)
        return (x - alpha_cumprod.sqrt() * x0) / (1 - alpha_cumprod).sqrt()

    return model_fn


# ----- t grids -----------------------------------------------------------------------------------
def test_linear_grid_runs_from_1_to_0_in_equal_steps():
    grid = linear_t_grid(4)
    assert grid.tolist() == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])


def test_v2_stage_c_grid_is_diffusers_default_stage_c_timesteps():
    grid = v2_stage_c_t_grid()
    assert len(grid) == 30 and grid[0] == 1.0 and grid[-1] == 0.0
    assert torch.equal(grid, torch.Tensor(DEFAULT_STAGE_C_TIMESTEPS))


def test_v2_stage_c_grid_spends_twenty_points_in_the_noisiest_third():
    assert int((v2_stage_c_t_grid() >= 2 / 3 - 1e-6).sum()) == 20


def test_resolve_t_grid_refuses_steps_that_contradict_the_v2_grid():
    with pytest.raises(ValueError, match="v2 Stage C t grid has 30 points"):
        resolve_t_grid("v2", 60)


def test_resolve_t_grid_refuses_an_increasing_grid():
    with pytest.raises(ValueError, match="strictly decreasing"):
        resolve_t_grid([0.0, 0.5, 1.0], None)


def test_resolve_t_grid_refuses_unknown_names():
    with pytest.raises(ValueError, match="unknown t grid 'cosine'"):
        resolve_t_grid("cosine", 10)


# ----- steps -------------------------------------------------------------------------------------
def test_ddpm_step_to_zero_with_the_true_noise_recovers_x0(noised):
    x0, eps, x_t = noised
    x_prev = ddpm_step(
        x_t, eps, torch.full((2,), 0.5), torch.zeros(2), generator=torch.Generator().manual_seed(1)
    )
    # Not exact by design: ᾱ(0) is clamped to 0.9999, which leaves x0·√0.9999 plus ~1e-4·ε.
    assert torch.allclose(x_prev, x0, atol=1e-3)


def test_ddpm_step_adds_no_noise_when_landing_on_zero(noised):
    _, eps, x_t = noised
    first = ddpm_step(x_t, eps, 0.5, 0.0, generator=torch.Generator().manual_seed(1))
    second = ddpm_step(x_t, eps, 0.5, 0.0, generator=torch.Generator().manual_seed(2))
    assert torch.equal(first, second)


def test_ddpm_step_still_draws_its_noise_on_the_last_step(noised):
    # Keeps one generator's stream in step with diffusers' scheduler, which draws on every step.
    _, eps, x_t = noised
    generator = torch.Generator().manual_seed(1)
    ddpm_step(x_t, eps, 0.5, 0.0, generator=generator)
    reference = torch.Generator().manual_seed(1)
    torch.randn(x_t.shape, generator=reference)
    assert torch.equal(torch.randn(3, generator=generator), torch.randn(3, generator=reference))


def test_ddpm_step_between_nonzero_times_has_the_posterior_variance(noised):
    _, eps, x_t = noised
    samples = torch.stack(
        [ddpm_step(x_t, eps, 0.5, 0.25, generator=torch.Generator().manual_seed(s)) for s in range(400)]
    )
    alpha_cumprod, alpha_cumprod_prev = cosine_alpha_cumprod(0.5).item(), cosine_alpha_cumprod(0.25).item()
    alpha = alpha_cumprod / alpha_cumprod_prev
    expected_var = (1 - alpha) * (1 - alpha_cumprod_prev) / (1 - alpha_cumprod)
    assert samples.var(dim=0).mean().item() == pytest.approx(expected_var, rel=0.05)


def test_ddpm_step_equals_diffusers_wuerstchen_scheduler_step_bit_for_bit(noised):
    _, eps, x_t = noised
    scheduler = DDPMWuerstchenScheduler()
    scheduler.set_timesteps(timesteps=DEFAULT_STAGE_C_TIMESTEPS)
    grid = scheduler.timesteps
    for i in (0, 10, 19, 28):
        r = grid[i].expand(2)
        expected = scheduler.step(eps, r, x_t, generator=torch.Generator().manual_seed(i)).prev_sample
        ours = ddpm_step(x_t, eps, r, grid[i + 1].expand(2), generator=torch.Generator().manual_seed(i))
        assert torch.equal(ours, expected), f"step {i}"


@pytest.mark.parametrize("t", [0.5, 1.0])
def test_ddim_step_to_zero_with_the_true_noise_recovers_x0(t):
    generator = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 4, 8, 8, generator=generator)
    x_t = add_noise(x0, torch.full((2,), t), eps)
    x_prev = ddim_step(x_t, eps, torch.full((2,), t), torch.zeros(2))
    # DDIM's last step lands on x̂0 exactly; float32 rounding is amplified by 1/√ᾱ (≤ 100 at t = 1).
    assert torch.allclose(x_prev, x0, atol=1e-4)


def test_ddim_step_with_eta_0_is_deterministic_and_keeps_the_noise_direction(noised):
    x0, eps, x_t = noised
    x_prev = ddim_step(x_t, eps, 0.5, 0.25)
    expected = add_noise(x0, torch.full((2,), 0.25), eps)  # same ε, lower noise level
    assert torch.allclose(x_prev, expected, atol=1e-5)


def test_ddim_step_with_eta_adds_fresh_noise(noised):
    _, eps, x_t = noised
    first = ddim_step(x_t, eps, 0.5, 0.25, eta=1.0, generator=torch.Generator().manual_seed(1))
    second = ddim_step(x_t, eps, 0.5, 0.25, eta=1.0, generator=torch.Generator().manual_seed(2))
    assert not torch.allclose(first, second)


def test_steps_reject_eps_of_another_shape(noised):
    _, _, x_t = noised
    with pytest.raises(ValueError, match="must have x_t's shape"):
        ddpm_step(x_t, x_t[:, :2], 0.5, 0.25)


def test_draw_noise_with_a_cpu_generator_matches_torch_randn():
    ours = draw_noise((2, 3), torch.Generator().manual_seed(5), "cpu", torch.float32)
    assert torch.equal(ours, torch.randn(2, 3, generator=torch.Generator().manual_seed(5)))


def test_draw_noise_with_one_generator_per_sample_draws_each_row_from_its_own():
    generators = [torch.Generator().manual_seed(s) for s in (7, 8)]
    ours = draw_noise((2, 3), generators)
    assert torch.equal(ours[1], torch.randn(1, 3, generator=torch.Generator().manual_seed(8))[0])


# ----- classifier-free guidance ------------------------------------------------------------------
class Recorder:
    """A model whose ε is its conditioning value broadcast over x; records the batches it sees."""

    def __init__(self):
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, x: torch.Tensor, r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        self.calls.append((x, c))
        return c.view(-1, 1, 1, 1).expand_as(x).clone()


def test_cfg_eps_is_lerp_from_uncond_to_cond_by_the_guidance_scale():
    x, t = torch.zeros(2, 1, 2, 2), torch.full((2,), 0.5)
    eps = cfg_eps(Recorder(), x, t, {"c": torch.tensor([3.0, 3.0])}, {"c": torch.tensor([1.0, 1.0])}, 4.0)
    assert torch.equal(eps, torch.full((2, 1, 2, 2), 1.0 + 4.0 * (3.0 - 1.0)))


def test_cfg_eps_makes_one_batched_call_conditional_half_first():
    model = Recorder()
    x = torch.randn(2, 1, 2, 2)
    cfg_eps(model, x, torch.rand(2), {"c": torch.tensor([3.0, 4.0])}, {"c": torch.tensor([1.0, 2.0])}, 4.0)
    assert len(model.calls) == 1
    seen_x, seen_c = model.calls[0]
    assert torch.equal(seen_x, torch.cat([x, x])) and seen_c.tolist() == [3.0, 4.0, 1.0, 2.0]


@pytest.mark.parametrize("scale, uncond", [(1.0, {"c": torch.tensor([1.0])}), (4.0, None)])
def test_cfg_eps_runs_one_conditional_pass_without_guidance(scale, uncond):
    model = Recorder()
    eps = cfg_eps(model, torch.zeros(1, 1, 2, 2), torch.rand(1), {"c": torch.tensor([3.0])}, uncond, scale)
    assert len(model.calls) == 1 and model.calls[0][0].shape[0] == 1
    assert torch.equal(eps, torch.full((1, 1, 2, 2), 3.0))


def test_cfg_eps_with_scale_0_is_the_unconditional_prediction():
    cond, uncond = {"c": torch.tensor([3.0])}, {"c": torch.tensor([1.0])}
    eps = cfg_eps(Recorder(), torch.zeros(1, 1, 1, 1), torch.rand(1), cond, uncond, 0.0)
    assert eps.item() == 1.0


def test_cfg_eps_refuses_mismatched_conditioning_names():
    with pytest.raises(ValueError, match="same inputs"):
        cfg_eps(
            Recorder(),
            torch.zeros(1, 1, 1, 1),
            torch.rand(1),
            {"c": torch.ones(1)},
            {"clip": torch.ones(1)},
            4.0,
        )


# ----- the sampling loop -------------------------------------------------------------------------
def test_sample_calls_the_model_once_per_step_at_decreasing_times():
    seen = []

    def model_fn(x, r):
        seen.append(r.clone())
        return torch.zeros_like(x)

    sample(model_fn, torch.randn(3, 4, 2, 2), linear_t_grid(5), generator=torch.Generator().manual_seed(0))
    assert torch.stack(seen).tolist() == [pytest.approx([t] * 3) for t in (1.0, 0.8, 0.6, 0.4, 0.2)]


# DDIM lands on x̂0 exactly; the DDPM's last step keeps ᾱ(0) = 0.9999 (the clamp), which leaves
# ≈ 1e-4/√(1 − ᾱ(1/15)) ≈ 8e-4 of the last noise draw in the result.
@pytest.mark.parametrize("sampler, atol", [("ddpm", 5e-3), ("ddim", 1e-4)])
def test_sample_with_an_oracle_model_arrives_at_its_x0(sampler, atol):
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    x = sample(
        oracle(x0), x_T, v2_stage_c_t_grid(), sampler=sampler, generator=torch.Generator().manual_seed(5)
    )
    assert torch.allclose(x, x0, atol=atol)


def test_sample_is_reproducible_with_a_generator():
    x_T = torch.randn(2, 4, 4, 4)

    def model_fn(x, r):
        return 0.5 * x

    runs = [
        sample(model_fn, x_T, linear_t_grid(4), generator=torch.Generator().manual_seed(9)) for _ in range(2)
    ]
    assert torch.equal(runs[0], runs[1])


def test_sample_refuses_an_unknown_sampler():
    with pytest.raises(ValueError, match="unknown sampler 'euler'"):
        sample(lambda x, r: x, torch.zeros(1, 1, 1, 1), linear_t_grid(2), sampler="euler")


def test_linear_grid_needs_at_least_one_step():
    with pytest.raises(ValueError, match="steps must be a positive int"):
        linear_t_grid(0)


def test_oracle_noise_is_the_true_noise(noised):
    # Guards the oracle used above: at t = 0.5 it returns exactly the ε that built x_t.
    x0, eps, x_t = noised
    assert torch.allclose(oracle(x0)(x_t, torch.full((2,), 0.5)), eps, atol=1e-5)
    assert math.isclose(cosine_alpha_cumprod(0.5).item(), 0.49384, abs_tol=1e-5)
