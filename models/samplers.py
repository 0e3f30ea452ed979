"""Samplers as small pure functions over a model callable and a decreasing t grid.

The networks know nothing of sampling and these functions know nothing of the networks (the
k-diffusion habit, STYLE.md): a model callable maps ``(x [B, ...], r [B]) -> ε [B, ...]``, a t grid
runs from 1 (noise) towards 0 (data), and a step moves x from one grid point to the next.

Exactness with the public v2 pipelines (diffusers' ``WuerstchenPriorPipeline`` /
``WuerstchenDecoderPipeline`` with ``DDPMWuerstchenScheduler``) is a design goal, so the DDPM step
evaluates its formula in the same order and precision, draws its noise with the same shape, dtype
and device rules, and draws it on every step — the last one included, where it is multiplied by 0 —
so that one ``torch.Generator`` yields the same images here and there.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from wurst.models.diffusion import COSINE_S, cosine_alpha_cumprod

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Generators = torch.Generator | Sequence[torch.Generator] | None

SAMPLERS = ("ddpm", "ddim")


def linear_t_grid(steps: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``steps`` equal steps from t = 1 to t = 0: ``[steps + 1]`` float32 (the v1 default grid).

    Same values as ``DDPMWuerstchenScheduler.set_timesteps(steps)`` (created on ``device`` as it does).
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    return torch.linspace(1.0, 0.0, steps + 1, device=device)


def v2_stage_c_t_grid(device: torch.device | str | None = None) -> torch.Tensor:
    """The v2 Stage C grid: ``[30]`` float32 points, i.e. 29 denoising steps (REFERENCE.md "Sampling").

    19 equal steps from t = 1 to 2/3, then 10 equal steps from 2/3 to 0: the public v2 pipeline
    spends two thirds of its steps in the noisiest third of time, where the prior lays out the
    image. Values equal diffusers' ``DEFAULT_STAGE_C_TIMESTEPS`` (float64 linspaces cast to float32).
    """
    # numpy's linspace, not torch's: the float64 points (and so their float32 rounding) must be
    # those of the public grid, and the two libraries place interior points differently.
    coarse = np.linspace(1.0, 2 / 3, 20)
    fine = np.linspace(2 / 3, 0.0, 11)[1:]
    return torch.tensor(np.concatenate([coarse, fine]), dtype=torch.float32).to(device)


def resolve_t_grid(
    grid: str | Sequence[float] | torch.Tensor | None,
    steps: int | None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """A t grid from a config spec: ``"linear"`` (or None) with ``steps``, ``"v2"``, or explicit values.

    Returns ``[N]`` float32, strictly decreasing, within [0, 1], N ≥ 2.
    """
    if grid is None or grid == "linear":
        if steps is None:
            raise ValueError("a linear t grid needs steps (an int ≥ 1); set e.g. decoder_steps: 12")
        t_grid = linear_t_grid(steps, device=device)
    elif grid == "v2":
        t_grid = v2_stage_c_t_grid(device=device)
        if steps is not None and steps != len(t_grid):
            raise ValueError(
                f"the v2 Stage C t grid has {len(t_grid)} points, but steps={steps} was asked; "
                f"set steps to null (or {len(t_grid)}), or use grid 'linear' for {steps} steps"
            )
    elif isinstance(grid, str):
        raise ValueError(
            f"unknown t grid {grid!r}; use 'linear', 'v2' or an explicit list of times from 1 to 0"
        )
    else:
        # float() per item: Hydra hands over a ListConfig, which torch cannot read directly.
        t_grid = grid if isinstance(grid, torch.Tensor) else torch.tensor([float(t) for t in grid])
        t_grid = t_grid.to(device=device, dtype=torch.float32)
    check_t_grid(t_grid)
    return t_grid


def check_t_grid(t_grid: torch.Tensor) -> None:
    """Raise a clear error unless ``t_grid`` is a 1-D, strictly decreasing grid in [0, 1] of ≥ 2 points."""
    if not isinstance(t_grid, torch.Tensor) or t_grid.dim() != 1 or t_grid.numel() < 2:
        shape = tuple(t_grid.shape) if isinstance(t_grid, torch.Tensor) else type(t_grid).__name__
        raise ValueError(f"t_grid must be a 1-D tensor of at least 2 times (1 → 0), got {shape}")
    if not bool((t_grid[1:] < t_grid[:-1]).all()):
        raise ValueError(
            f"t_grid must be strictly decreasing (noise at t=1 towards data at t=0), got {t_grid.tolist()}"
        )
    if float(t_grid.min()) < 0 or float(t_grid.max()) > 1:
        raise ValueError(f"t_grid values must lie in [0, 1], got {t_grid.tolist()}")


def draw_noise(
    shape: Sequence[int],
    generator: Generators = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Standard normal noise of ``shape``, drawn as diffusers' ``randn_tensor`` draws it.

    A CPU generator draws on the CPU and the result moves to ``device`` (so a CPU seed reproduces a
    GPU run); a list of generators draws sample i of the batch from generator i.
    """
    shape = tuple(shape)
    device = torch.device(device) if device is not None else torch.device("cpu")
    if isinstance(generator, Sequence) and not isinstance(generator, torch.Generator):
        generators = list(generator)
        if len(generators) == 1:
            generator = generators[0]
        else:
            if len(generators) != shape[0]:
                raise ValueError(
                    f"got {len(generators)} generators for a batch of {shape[0]}; pass one generator, "
                    "or exactly one per sample"
                )
            draw_device = _draw_device(generators[0], device)
            per_sample = [
                torch.randn((1, *shape[1:]), generator=g, device=draw_device, dtype=dtype) for g in generators
            ]
            return torch.cat(per_sample, dim=0).to(device)
    draw_device = _draw_device(generator, device)
    return torch.randn(shape, generator=generator, device=draw_device, dtype=dtype).to(device)


def _draw_device(generator: torch.Generator | None, device: torch.device) -> torch.device:
    if generator is None or generator.device.type == device.type:
        return device
    if generator.device.type == "cpu":
        return torch.device("cpu")
    raise ValueError(
        f"cannot draw {device} noise from a {generator.device.type} generator; "
        f"make the generator on the CPU or on {device}"
    )


def _times_like(t: torch.Tensor | float, x: torch.Tensor, s: float = COSINE_S) -> torch.Tensor:
    """t (scalar or ``[B]``) → ᾱ(t) shaped to broadcast against ``x`` ``[B, ...]``."""
    t = torch.as_tensor(t, device=x.device)
    if t.dim() > 1 or (t.dim() == 1 and t.shape[0] not in (1, x.shape[0])):
        raise ValueError(f"times must be a scalar or [B={x.shape[0]}], got shape {tuple(t.shape)}")
    alpha_cumprod = cosine_alpha_cumprod(t, s)
    return alpha_cumprod.view(-1, *([1] * (x.dim() - 1))) if t.dim() == 1 else alpha_cumprod


def _check_step_inputs(x_t: torch.Tensor, eps: torch.Tensor) -> None:
    if eps.shape != x_t.shape:
        raise ValueError(
            f"eps {tuple(eps.shape)} must have x_t's shape {tuple(x_t.shape)}; the model must predict "
            "noise at the sample's resolution"
        )


def ddpm_step(
    x_t: torch.Tensor,
    eps: torch.Tensor,
    t: torch.Tensor | float,
    t_prev: torch.Tensor | float,
    generator: Generators = None,
    noise: torch.Tensor | None = None,
    s: float = COSINE_S,
) -> torch.Tensor:
    """One ancestral DDPM step of Würstchen from t to t_prev < t (the ``DDPMWuerstchenScheduler`` step).

    With α = ᾱ(t)/ᾱ(t_prev):
    μ = √(1/α)·(x_t − (1 − α)·ε/√(1 − ᾱ(t))),  σ² = (1 − α)·(1 − ᾱ(t_prev))/(1 − ᾱ(t)),
    x_prev = μ + σ·z, and no noise where t_prev == 0 (z is still drawn there, keeping the generator's
    stream in step with diffusers).

    x_t, eps: ``[B, C, H, W]``; t, t_prev: scalar or ``[B]``; noise: optional z like x_t (otherwise
    drawn from ``generator`` in eps's dtype on eps's device). Returns x_prev in eps's dtype.
    """
    _check_step_inputs(x_t, eps)
    alpha_cumprod = _times_like(t, x_t, s)
    alpha_cumprod_prev = _times_like(t_prev, x_t, s)
    alpha = alpha_cumprod / alpha_cumprod_prev
    # The same operation order as diffusers, so float32 results match bit for bit.
    mu = (1.0 / alpha).sqrt() * (x_t - (1 - alpha) * eps / (1 - alpha_cumprod).sqrt())
    if noise is None:
        noise = draw_noise(mu.shape, generator=generator, device=eps.device, dtype=eps.dtype)
    elif noise.shape != mu.shape:
        raise ValueError(f"noise must have x_t's shape {tuple(mu.shape)}, got {tuple(noise.shape)}")
    std = ((1 - alpha) * (1.0 - alpha_cumprod_prev) / (1.0 - alpha_cumprod)).sqrt() * noise
    t_prev = torch.as_tensor(t_prev, device=x_t.device)
    keep_noise = (t_prev != 0).float()
    keep_noise = keep_noise.view(-1, *([1] * (x_t.dim() - 1))) if keep_noise.dim() == 1 else keep_noise
    return (mu + std * keep_noise).to(eps.dtype)


def ddim_step(
    x_t: torch.Tensor,
    eps: torch.Tensor,
    t: torch.Tensor | float,
    t_prev: torch.Tensor | float,
    eta: float = 0.0,
    generator: Generators = None,
    noise: torch.Tensor | None = None,
    s: float = COSINE_S,
) -> torch.Tensor:
    """One DDIM step (Song et al. 2021, eq. 12) from t to t_prev < t on the cosine schedule.

    x̂0 = (x_t − √(1 − ᾱ)·ε)/√ᾱ;  x_prev = √ᾱ_prev·x̂0 + √(1 − ᾱ_prev − σ²)·ε + σ·z with
    σ = η·√((1 − ᾱ_prev)/(1 − ᾱ))·√(1 − ᾱ/ᾱ_prev). η = 0 is deterministic. At t_prev == 0 the step
    lands on x̂0 itself (ᾱ_prev taken as 1, not the clamped 0.9999), as DDIM's last step should.

    x_t, eps: ``[B, C, H, W]``; t, t_prev: scalar or ``[B]``. Noise is drawn only when η > 0.
    """
    _check_step_inputs(x_t, eps)
    if eta < 0:
        raise ValueError(f"eta must be ≥ 0 (0 = deterministic DDIM, 1 ≈ DDPM), got {eta}")
    alpha_cumprod = _times_like(t, x_t, s)
    t_prev_tensor = torch.as_tensor(t_prev, device=x_t.device)
    alpha_cumprod_prev = _times_like(t_prev_tensor, x_t, s)
    at_zero = t_prev_tensor == 0
    at_zero = at_zero.view(-1, *([1] * (x_t.dim() - 1))) if at_zero.dim() == 1 else at_zero
    alpha_cumprod_prev = torch.where(at_zero, torch.ones_like(alpha_cumprod_prev), alpha_cumprod_prev)

    x0_pred = (x_t - (1 - alpha_cumprod).sqrt() * eps) / alpha_cumprod.sqrt()
    sigma = (
        eta
        * ((1 - alpha_cumprod_prev) / (1 - alpha_cumprod)).sqrt()
        * (1 - alpha_cumprod / alpha_cumprod_prev).sqrt()
    )
    direction = (1 - alpha_cumprod_prev - sigma**2).clamp(min=0).sqrt() * eps
    x_prev = alpha_cumprod_prev.sqrt() * x0_pred + direction
    if eta > 0:
        if noise is None:
            noise = draw_noise(x_t.shape, generator=generator, device=eps.device, dtype=eps.dtype)
        x_prev = x_prev + sigma * noise
    return x_prev.to(eps.dtype)


def cfg_eps(
    model_fn: Callable[..., torch.Tensor],
    x: torch.Tensor,
    t: torch.Tensor,
    cond: Mapping[str, torch.Tensor | None],
    uncond: Mapping[str, torch.Tensor | None] | None,
    guidance_scale: float,
) -> torch.Tensor:
    """Classifier-free guided ε = lerp(ε_uncond, ε_cond, w) (REFERENCE.md "Sampling").

    ``model_fn(x, t, **conditioning)`` is called once on the batch ``[x; x]`` with conditionings
    ``[cond; uncond]`` concatenated along dim 0 — conditional half first, as the public pipelines
    batch it — and the two halves are mixed with ``torch.lerp``. w = 1 or ``uncond`` None is a
    single conditional pass; w = 0 gives ε_uncond.

    x: ``[B, ...]``; t: ``[B]``; cond/uncond: keyword → ``[B, ...]`` tensor (or None on both sides).
    Returns ε ``[B, ...]``.
    """
    if uncond is None or guidance_scale == 1:
        return model_fn(x, t, **cond)
    if set(cond) != set(uncond):
        raise ValueError(
            f"cond and uncond must name the same inputs, got {sorted(cond)} and {sorted(uncond)}; "
            "pass an unconditional value (e.g. empty-caption states, zero latents) for each"
        )
    batched: dict[str, torch.Tensor | None] = {}
    for name, value in cond.items():
        other = uncond[name]
        if value is None or other is None:
            if value is not other:
                raise ValueError(
                    f"conditioning {name!r} is None on one side only; give both halves or neither"
                )
            batched[name] = None
            continue
        if value.shape != other.shape:
            raise ValueError(
                f"conditioning {name!r}: cond {tuple(value.shape)} and uncond {tuple(other.shape)} must match"
            )
        batched[name] = torch.cat([value, other], dim=0)
    eps_cond, eps_uncond = model_fn(torch.cat([x, x], dim=0), torch.cat([t, t], dim=0), **batched).chunk(2)
    return torch.lerp(eps_uncond, eps_cond, guidance_scale)


def sample(
    model_fn: ModelFn,
    x_T: torch.Tensor,
    t_grid: torch.Tensor,
    sampler: str = "ddpm",
    generator: Generators = None,
    eta: float = 0.0,
    progress: bool = False,
    desc: str | None = None,
    callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
    s: float = COSINE_S,
) -> torch.Tensor:
    """Run ``model_fn`` down ``t_grid`` from x_T: one step per consecutive pair of grid points.

    model_fn: ``(x [B, ...], r [B]) -> ε [B, ...]``, r in x's dtype (wrap CFG into it with
    ``cfg_eps``). x_T: ``[B, ...]`` noise at t_grid[0]. t_grid: ``[N]`` decreasing in [0, 1].
    sampler: "ddpm" (ancestral, uses ``generator``) or "ddim" (η = ``eta``); ``s``: the cosine schedule's
    offset the model was trained with. ``progress`` shows a
    tqdm bar; ``callback(i, r, x)`` sees each new x. Returns x at t_grid[-1], ``[B, ...]``.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")
    t_grid = t_grid.to(x_T.device)
    check_t_grid(t_grid)
    batch = x_T.shape[0]
    x = x_T
    for i in tqdm(range(len(t_grid) - 1), desc=desc, disable=not progress):
        # r in the sample's dtype and t_prev in the grid's, as the public pipelines pass them.
        r = t_grid[i].expand(batch).to(x.dtype)
        r_prev = t_grid[i + 1].expand(batch)
        eps = model_fn(x, r)
        if sampler == "ddpm":
            x = ddpm_step(x, eps, r, r_prev, generator=generator, s=s)
        else:
            x = ddim_step(x, eps, r, r_prev, eta=eta, generator=generator, s=s)
        if callback is not None:
            callback(i, r, x)
    return x
