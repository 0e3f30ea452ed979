"""The diffusion maths shared by Stage B and Stage C: schedule, noising, training time, loss.

Everything follows REFERENCE.md "Diffusion, as the official code does it": continuous time
t ∈ [0, 1] (t = 0 clean, t = 1 pure noise), the cosine schedule with s = 0.008, ε-prediction and a
p2-weighted MSE. The schedule is computed in the same float32 arithmetic as diffusers'
``DDPMWuerstchenScheduler`` so that sampling with these functions reproduces the public pipelines
bit for bit (see ``models/samplers.py``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

# REFERENCE.md "Diffusion": cosine schedule offset and the clamp that keeps ᾱ away from 0 and 1
# (ᾱ = 1 would make the p2 weight and the DDPM posterior divide by zero; ᾱ = 0 makes x0 unrecoverable).
COSINE_S = 0.008
ALPHA_CUMPROD_MIN = 1e-4
ALPHA_CUMPROD_MAX = 0.9999

# REFERENCE.md "Diffusion": training t = clamp((1 − u)·1.08 + 0.001, 0.001, 1.0), u ~ U[0, 1).
# The 1.08 stretch puts 7.5 % of the draws on the clamp at t = 1 (pure noise).
TRAINING_T_STRETCH = 1.08
TRAINING_T_MIN = 0.001
TRAINING_T_MAX = 1.0

# REFERENCE.md "Diffusion": p2 weight (k + ᾱ/(1 − ᾱ))^(−γ) with k = γ = 1.
P2_K = 1.0
P2_GAMMA = 1.0


def _as_time(t: torch.Tensor | float, name: str = "t") -> torch.Tensor:
    """Continuous time as a tensor of at least float32 (float64 stays float64)."""
    if not isinstance(t, torch.Tensor):
        t = torch.tensor(t, dtype=torch.float32)
    if t.is_complex() or not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64)):
        raise TypeError(f"{name} must be a real tensor of times in [0, 1], got dtype {t.dtype}")
    # Half-precision times are evaluated in float32, as diffusers' scheduler does (its s is a float32
    # tensor, so type promotion lifts fp16/bf16 times to float32).
    return t.to(torch.promote_types(t.dtype, torch.float32))


def cosine_alpha_cumprod(
    t: torch.Tensor | float,
    s: float = COSINE_S,
    clamp: tuple[float, float] = (ALPHA_CUMPROD_MIN, ALPHA_CUMPROD_MAX),
) -> torch.Tensor:
    """ᾱ(t) of the cosine schedule, clamped to [1e-4, 0.9999] (REFERENCE.md "Diffusion").

    ᾱ(t) = cos²(((t + s)/(1 + s))·π/2) / cos²((s/(1 + s))·π/2).

    t: any shape (``[B]`` in practice), values in [0, 1] → ᾱ with the same shape, float32 (float64
    for float64 t). ᾱ(0) = 0.9999 after the clamp, ᾱ(0.5) ≈ 0.4937, ᾱ(1) = 1e-4 after the clamp.
    """
    t = _as_time(t)
    # s as a float32 tensor, and the operations in this order, so the float32 result equals diffusers'
    # DDPMWuerstchenScheduler._alpha_cumprod bit for bit (1 + s in float32 is not float32(1.008)).
    s_t = torch.tensor(s, dtype=torch.float32, device=t.device)
    alpha_cumprod_0 = torch.cos(s_t / (1 + s_t) * torch.pi * 0.5) ** 2
    alpha_cumprod = torch.cos((t + s_t) / (1 + s_t) * torch.pi * 0.5) ** 2 / alpha_cumprod_0
    return alpha_cumprod.clamp(float(clamp[0]), float(clamp[1]))


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape per-sample ``[B]`` (or a scalar) to broadcast against ``like`` ``[B, ...]``."""
    if values.dim() == 0:
        return values
    return values.view(values.shape[0], *([1] * (like.dim() - 1)))


def _check_time_batch(t: torch.Tensor, x: torch.Tensor, t_name: str, x_name: str) -> None:
    if t.dim() > 1 or (t.dim() == 1 and t.shape[0] != x.shape[0]):
        raise ValueError(
            f"{t_name} must be a scalar or one time per sample [B={x.shape[0]}] matching {x_name} "
            f"{tuple(x.shape)}, got shape {tuple(t.shape)}; pass a 1-D tensor of length {x.shape[0]}"
        )


CLAMP = (ALPHA_CUMPROD_MIN, ALPHA_CUMPROD_MAX)


def add_noise(
    x0: torch.Tensor, t: torch.Tensor | float, noise: torch.Tensor, s: float = COSINE_S,
    clamp: tuple[float, float] = CLAMP,
) -> torch.Tensor:
    """Forward process: x_t = √ᾱ(t)·x0 + √(1 − ᾱ(t))·ε (REFERENCE.md "Diffusion", "Noising").

    x0: ``[B, C, H, W]`` (any ``[B, ...]``); t: ``[B]`` or scalar in [0, 1]; noise: like x0.
    Returns x_t like x0, in x0's dtype.
    """
    if noise.shape != x0.shape:
        raise ValueError(
            f"noise must have x0's shape {tuple(x0.shape)}, got {tuple(noise.shape)}; "
            "draw it with torch.randn_like(x0)"
        )
    t = _as_time(t).to(x0.device)
    _check_time_batch(t, x0, "t", "x0")
    alpha_cumprod = _per_sample(cosine_alpha_cumprod(t, s, clamp), x0)
    x_t = alpha_cumprod.sqrt() * x0 + (1 - alpha_cumprod).sqrt() * noise
    return x_t.to(x0.dtype)


def sample_training_t(
    batch_size: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    stretch: float = TRAINING_T_STRETCH,
    t_min: float = TRAINING_T_MIN,
) -> torch.Tensor:
    """Training times t = clamp((1 − u)·1.08 + 0.001, 0.001, 1.0), u ~ U[0, 1) (REFERENCE.md "Diffusion").

    Returns ``[batch_size]`` float32 on ``device``. With a generator the uniforms are drawn on the
    generator's device (so a CPU generator seeds a CUDA run reproducibly) and then moved.
    """
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    draw_device = generator.device if generator is not None else device
    u = torch.rand(batch_size, generator=generator, device=draw_device)
    t = ((1 - u) * stretch + t_min).clamp(t_min, TRAINING_T_MAX)
    return t.to(device) if device is not None else t


def p2_weight(
    t: torch.Tensor | float, k: float = P2_K, gamma: float = P2_GAMMA, s: float = COSINE_S,
    clamp: tuple[float, float] = CLAMP,
) -> torch.Tensor:
    """Perception-prioritised loss weight (k + ᾱ/(1 − ᾱ))^(−γ) (REFERENCE.md "Diffusion", "Loss").

    t: any shape → weights with that shape. With k = γ = 1 this is 1 − ᾱ(t): ≈ 1e-4 at t = 0 (where
    the clamp caps ᾱ at 0.9999), 0.9999 at t = 1.
    """
    alpha_cumprod = cosine_alpha_cumprod(t, s, clamp)
    return (k + alpha_cumprod / (1 - alpha_cumprod)) ** (-gamma)


def diffusion_loss(
    eps_pred: torch.Tensor,
    eps: torch.Tensor,
    t: torch.Tensor,
    k: float = P2_K,
    gamma: float = P2_GAMMA,
    s: float = COSINE_S,
    clamp: tuple[float, float] = CLAMP,
) -> tuple[torch.Tensor, torch.Tensor]:
    """p2-weighted ε-prediction loss (REFERENCE.md "Diffusion", "Loss").

    eps_pred, eps: ``[B, C, H, W]``; t: ``[B]``. Returns (the batch mean of the weighted losses — a
    scalar to backpropagate, per-sample MSE over C, H, W times p2(t) ``[B]``). The MSE is taken in
    float32 so bf16 autocast does not round the squared errors.
    """
    if eps_pred.shape != eps.shape:
        raise ValueError(
            f"eps_pred {tuple(eps_pred.shape)} and eps {tuple(eps.shape)} must have the same shape; "
            "the network must predict the noise at the input's resolution"
        )
    if eps.dim() < 2:
        raise ValueError(f"eps must be batched [B, ...], got shape {tuple(eps.shape)}")
    t = _as_time(t).to(eps.device)
    if t.dim() != 1 or t.shape[0] != eps.shape[0]:
        raise ValueError(
            f"t must hold one time per sample, shape [{eps.shape[0]}], got {tuple(t.shape)}; "
            "use the t that noised this batch"
        )
    squared_error = (eps_pred.float() - eps.float()) ** 2
    mse = squared_error.mean(dim=tuple(range(1, eps.dim())))  # [B]
    per_sample = mse * p2_weight(t, k=k, gamma=gamma, s=s, clamp=clamp).float()
    return per_sample.mean(), per_sample


@dataclass(frozen=True)
class DiffusionSettings:
    """The numbers of ``conf/diffusion/<name>.yaml`` that the maths above takes, read in one place.

    Training (noising, training t, loss), the samplers and the Hub export all take them from here, so a
    run with ``diffusion.schedule.s=0.02`` trains, samples and publishes 0.02.
    """

    s: float = COSINE_S
    clamp: tuple[float, float] = CLAMP
    t_stretch: float = TRAINING_T_STRETCH
    t_min: float = TRAINING_T_MIN
    p2_k: float = P2_K
    p2_gamma: float = P2_GAMMA

    @classmethod
    def from_config(cls, diffusion: Mapping[str, Any] | None) -> DiffusionSettings:
        """From a ``diffusion`` config (``schedule: {name, s, clamp}``, ``training_t: {scale, eps}``,
        ``p2: {k, gamma}``); absent keys keep REFERENCE.md's values, unknown schedule names are refused."""
        diffusion = dict(diffusion or {})
        schedule = dict(diffusion.get("schedule") or {})
        if schedule.get("name", "cosine") != "cosine":
            raise ValueError(
                f"diffusion.schedule.name={schedule['name']!r}: only the cosine schedule (REFERENCE.md) is implemented"
            )
        training_t = dict(diffusion.get("training_t") or {})
        p2 = dict(diffusion.get("p2") or {})
        clamp = tuple(float(v) for v in schedule.get("clamp", CLAMP))
        settings = cls(
            s=float(schedule.get("s", COSINE_S)),
            clamp=clamp,
            t_stretch=float(training_t.get("scale", TRAINING_T_STRETCH)),
            t_min=float(training_t.get("eps", TRAINING_T_MIN)),
            p2_k=float(p2.get("k", P2_K)),
            p2_gamma=float(p2.get("gamma", P2_GAMMA)),
        )
        if not (len(clamp) == 2 and 0 < clamp[0] < clamp[1] < 1) or not settings.s > 0:
            raise ValueError(
                f"diffusion.schedule s={settings.s}, clamp={list(clamp)}: need s > 0 and 0 < clamp[0] < clamp[1] < 1"
            )
        return settings

    def alpha_cumprod(self, t: torch.Tensor | float) -> torch.Tensor:
        return cosine_alpha_cumprod(t, self.s, self.clamp)

    def add_noise(self, x0: torch.Tensor, t: torch.Tensor | float, noise: torch.Tensor) -> torch.Tensor:
        return add_noise(x0, t, noise, self.s, self.clamp)

    def training_t(
        self, batch_size: int, generator: torch.Generator | None = None, device: torch.device | str | None = None
    ) -> torch.Tensor:
        return sample_training_t(batch_size, generator, device, stretch=self.t_stretch, t_min=self.t_min)

    def loss(self, eps_pred: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return diffusion_loss(eps_pred, eps, t, k=self.p2_k, gamma=self.p2_gamma, s=self.s, clamp=self.clamp)
