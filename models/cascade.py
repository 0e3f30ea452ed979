"""The cascade sampler: captions → Stage C → Stage B → Stage A → images (REFERENCE.md "The cascade").

Inference runs the stages in the opposite order to training. Stage C samples a semantic latent in
its normalised space from CLIP-bigG text states; the v2 hand-off turns it into the compressor's
scale (z = 42·x − 1); Stage B samples Stage A latents ℓ conditioned on z and CLIP-H text states;
Stage A decodes 0.3764·ℓ into pixels (REFERENCE.md "Hand-offs in the public v2 pipeline").

Exactness with diffusers' ``WuerstchenPriorPipeline`` + ``WuerstchenDecoderPipeline`` (and so
``WuerstchenCombinedPipeline``) for the same weights, generator, t grids and guidance is a design
goal: the initial noise and every step's noise are drawn from the one generator in the same order,
shapes, dtypes and devices; CFG batches the conditional half first and mixes with ``torch.lerp``;
Stage B's unconditional half sees zero semantic latents; text is encoded separately for the
conditional and the unconditional captions; latent sizes are ceil(side/42.67) and int(side·10.67).
One deliberate difference: diffusers' decoder repeats the text states once per *image* even for a
list of prompts (it only works for a single prompt); here each prompt's states go with its own images.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

from wurst.models.diffusion import COSINE_S
from wurst.models.samplers import SAMPLERS, Generators, cfg_eps, draw_noise, resolve_t_grid, sample

TextEncoderFn = Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]]

# REFERENCE.md "Hand-offs in the public v2 pipeline".
LATENT_MEAN = 42.0  # Stage C's x → z = LATENT_MEAN·x − LATENT_STD (diffusers names the offset "latent_std")
LATENT_STD = 1.0
RESOLUTION_MULTIPLE = 42.67  # image side / Stage C latent side (42:1 spatial compression)
LATENT_DIM_SCALE = 10.67  # Stage B latent side / Stage C latent side
STAGE_B_LATENT_CHANNELS = 4  # Stage A's latent channels (REFERENCE.md "The cascade", Stage A row)
STAGE_C_LATENT_CHANNELS = 16  # the compressor's channels, used when Stage C's width cannot be read

# REFERENCE.md "Sampling" and diffusers' v2 pipeline: 30-point custom grid for Stage C, w = 4;
# Stage B 12 linear steps, w = 4.
PRIOR_T_GRID = "v2"
PRIOR_GUIDANCE_SCALE = 4.0
DECODER_T_GRID = "linear"
DECODER_STEPS = 12
DECODER_GUIDANCE_SCALE = 0.0  # the released call runs Stage B unguided


@dataclass(eq=False)
class CascadeSampler:
    """Text-to-image sampling through the three stages; any modules with the contract's signatures.

    stage_c: ``(x [B, 16, h, w], r [B], c [B, L, c_cond]) -> ε`` (``StageC`` or ``WuerstchenPrior``).
    stage_b: ``(x [B, 4, H/4, W/4], r [B], effnet [B, 16, h, w], clip [B, L, clip_embd]) -> ε``
    (``StageB`` or ``WuerstchenDiffNeXt``).
    stage_a: has ``.decode(latents [B, 4, H/4, W/4])`` returning ``[B, 3, H, W]`` or an object with
    ``.sample`` (``StageA`` or ``PaellaVQModel``); its ``scale_factor`` (or ``config.scale_factor``)
    is the 0.3764 of the hand-off unless ``vqgan_scale_factor`` is given.
    text_encoder_c / text_encoder_b: ``captions: list[str] -> (hidden [B, L, D], pooled [B, D])``.

    Guidance follows the public pipelines: it is applied only for w > 1; w ≤ 1 runs the
    conditional model alone (so diffusers' decoder default w = 0 means "no guidance").
    t grids: ``"v2"`` (Stage C's 30-point grid), ``"linear"`` with ``*_steps``, or explicit times 1 → 0.
    """

    stage_c: Callable[..., torch.Tensor]
    stage_b: Callable[..., torch.Tensor]
    stage_a: Any
    text_encoder_c: TextEncoderFn
    text_encoder_b: TextEncoderFn
    sampler: str = "ddpm"
    eta: float = 0.0
    prior_t_grid: str | Sequence[float] | None = PRIOR_T_GRID
    prior_steps: int | None = None
    prior_guidance_scale: float = PRIOR_GUIDANCE_SCALE
    decoder_t_grid: str | Sequence[float] | None = DECODER_T_GRID
    decoder_steps: int | None = DECODER_STEPS
    decoder_guidance_scale: float = DECODER_GUIDANCE_SCALE
    latent_mean: float = LATENT_MEAN
    latent_std: float = LATENT_STD
    resolution_multiple: float = RESOLUTION_MULTIPLE
    latent_dim_scale: float = LATENT_DIM_SCALE
    vqgan_scale_factor: float | None = None
    progress: bool = False
    # The cosine schedule offsets the stages were trained with (their exports' diffusion.schedule.s).
    prior_schedule_s: float = COSINE_S
    decoder_schedule_s: float = COSINE_S

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        # Stored as floats: Hydra hands over ints for "4" and the hand-off arithmetic must stay float.
        for name in ("eta", "prior_guidance_scale", "decoder_guidance_scale", "latent_mean", "latent_std",
                     "prior_schedule_s", "decoder_schedule_s"):
            setattr(self, name, _check_finite(name, getattr(self, name)))
        for name in ("resolution_multiple", "latent_dim_scale"):
            setattr(self, name, _check_finite(name, getattr(self, name)))
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        # Resolve the grids once now so a bad config fails before any model runs.
        resolve_t_grid(self.prior_t_grid, self.prior_steps)
        resolve_t_grid(self.decoder_t_grid, self.decoder_steps)
        if self.vqgan_scale_factor is None:
            self.vqgan_scale_factor = _stage_a_scale_factor(self.stage_a)
        self.vqgan_scale_factor = _check_finite("vqgan_scale_factor", self.vqgan_scale_factor)

        # Widths read from the contract's state-dict names (shared by our classes and diffusers').
        self._stage_c_channels = _in_features(self.stage_c, r"projection\.weight")
        self._stage_c_text_width = _in_features(self.stage_c, r"cond_mapper\.0\.weight")
        self._stage_b_text_width = _in_features(self.stage_b, r"clip_mapper\.weight")
        self._stage_b_effnet_width = _in_features(self.stage_b, r"effnet_mappers\.\d+\.weight")
        if (
            self._stage_c_channels is not None
            and self._stage_b_effnet_width is not None
            and self._stage_c_channels != self._stage_b_effnet_width
        ):
            raise ValueError(
                f"stage_c samples {self._stage_c_channels}-channel semantic latents but stage_b's effnet "
                f"mappers take {self._stage_b_effnet_width} channels; use Stage B and Stage C trained on the "
                "same semantic compressor (c_in of Stage C == effnet_embd of Stage B)"
            )
        self._stage_b_multiple = _stage_b_size_multiple(self.stage_b)

    def describe(self) -> str:
        """The settings images are drawn with, in one line (wurst-generate prints it, results.md states it)."""

        def grid(t_grid: Any, steps: int | None) -> str:
            if t_grid == "v2":
                return "v2 grid (29 steps)"
            if isinstance(t_grid, str) or t_grid is None:
                return f"{t_grid or 'linear'} grid, {steps} steps"
            return f"explicit grid ({len(t_grid) - 1} steps)"

        return (
            f"{self.sampler}; Stage C {grid(self.prior_t_grid, self.prior_steps)} at w = {self.prior_guidance_scale:g}; "
            f"Stage B {grid(self.decoder_t_grid, self.decoder_steps)} at w = {self.decoder_guidance_scale:g}; "
            f"hand-off z = {self.latent_mean:g}·x − {self.latent_std:g}"
        )

    # ----- sizes -------------------------------------------------------------------------------
    def latent_sizes(self, height: int, width: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """Stage C and Stage B latent sides for an image size: ((h_c, w_c), (h_b, w_b)).

        h_c = ceil(height / 42.67), h_b = int(h_c · 10.67) (REFERENCE.md "Hand-offs"); the decoded
        image is Stage A's upsampling of h_b (4·h_b for the f4 VQGAN), which equals ``height`` for
        multiples of 128. Raises when Stage B cannot run at that size.
        """
        sides = []
        for name, side in (("height", height), ("width", width)):
            if not isinstance(side, int) or isinstance(side, bool) or side < 1:
                raise ValueError(f"{name} must be a positive int number of pixels, got {side!r}")
            side_c = math.ceil(side / self.resolution_multiple)
            side_b = int(side_c * self.latent_dim_scale)
            multiple = self._stage_b_multiple
            if multiple is not None and (side_b < multiple or side_b % multiple != 0):
                suggestion = self._next_valid_side(side_c, multiple)
                raise ValueError(
                    f"{name}={side} is too small or misaligned for the cascade: it gives a Stage C latent "
                    f"side of {side_c} and a Stage B latent side of {side_b}, but stage_b needs a multiple of "
                    f"{multiple} (patch size × 2^(levels − 1)); use {name}={suggestion} (multiples of 128 "
                    "work for the paper's constants)"
                )
            sides.append((side_c, side_b))
        (height_c, height_b), (width_c, width_b) = sides
        return (height_c, width_c), (height_b, width_b)

    def _next_valid_side(self, side_c: int, multiple: int) -> int | str:
        for candidate in range(max(side_c, 1), side_c + 10_000):
            if int(candidate * self.latent_dim_scale) % multiple == 0:
                return math.floor(candidate * self.resolution_multiple)
        return "a larger size"

    # ----- the two halves ----------------------------------------------------------------------
    @torch.no_grad()
    def sample_prior(
        self,
        prompts: str | Sequence[str],
        height: int,
        width: int,
        generator: Generators = None,
        num_images_per_prompt: int = 1,
        negative_prompts: str | Sequence[str] | None = None,
        guidance_scale: float | None = None,
    ) -> torch.Tensor:
        """Stage C: captions → semantic latents z ``[B·n, 16, ceil(H/42.67), ceil(W/42.67)]``.

        z is on the compressor's scale (z = 42·x − 1), ready for ``sample_decoder``; images of
        prompt i are rows i·n … i·n + n − 1. Draws the initial noise, then one noise per step.
        """
        prompts = _check_prompts(prompts)
        negatives = _check_negative_prompts(negative_prompts, len(prompts))
        repeats = _check_positive_int("num_images_per_prompt", num_images_per_prompt)
        w = (
            self.prior_guidance_scale
            if guidance_scale is None
            else _check_finite("guidance_scale", guidance_scale)
        )
        (height_c, width_c), _ = self.latent_sizes(height, width)
        device, dtype = _device_and_dtype(self.stage_c)

        with _eval_mode(self.stage_c, self.text_encoder_c):
            cond, uncond = self._encode_text(
                self.text_encoder_c,
                "text_encoder_c",
                self._stage_c_text_width,
                "stage_c's c_cond",
                prompts,
                negatives,
                repeats,
                guided=w > 1,
            )
            dtype = dtype or cond.dtype
            device = device or cond.device
            cond, uncond = _move(cond, device, dtype), _move(uncond, device, dtype)
            channels = self._stage_c_channels or STAGE_C_LATENT_CHANNELS
            x_T = draw_noise((cond.shape[0], channels, height_c, width_c), generator, device, dtype)
            t_grid = resolve_t_grid(self.prior_t_grid, self.prior_steps, device=device)
            model_fn = partial(
                _guided, self.stage_c, cond={"c": cond}, uncond={"c": uncond} if w > 1 else None, w=w
            )
            x = sample(
                model_fn,
                x_T,
                t_grid,
                self.sampler,
                generator=generator,
                eta=self.eta,
                progress=self.progress,
                desc="Stage C",
                s=self.prior_schedule_s,
            )
        # The v2 hand-off (REFERENCE.md): Stage C models (z + 1)/42, so z = 42·x − 1.
        return x * self.latent_mean - self.latent_std

    @torch.no_grad()
    def sample_decoder(
        self,
        z: torch.Tensor,
        prompts: str | Sequence[str],
        generator: Generators = None,
        negative_prompts: str | Sequence[str] | None = None,
        guidance_scale: float | None = None,
    ) -> torch.Tensor:
        """Stage B then Stage A: semantic latents z ``[B, 16, h, w]`` → images ``[B, 3, 4·int(10.67h), …]`` in [0, 1].

        ``prompts`` has one caption per group of B/len(prompts) consecutive rows of z (one caption
        for all rows is fine). Stage B's unconditional half sees zero semantic latents.
        """
        prompts = _check_prompts(prompts)
        negatives = _check_negative_prompts(negative_prompts, len(prompts))
        if not isinstance(z, torch.Tensor) or z.dim() != 4:
            shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise ValueError(f"z must be semantic latents [B, 16, h, w] from sample_prior, got {shape}")
        if self._stage_b_effnet_width is not None and z.shape[1] != self._stage_b_effnet_width:
            raise ValueError(
                f"z has {z.shape[1]} channels but stage_b's effnet mappers take {self._stage_b_effnet_width}; "
                "pass latents from the Stage C (or compressor) that this Stage B was trained with"
            )
        if z.shape[0] % len(prompts) != 0:
            raise ValueError(
                f"z holds {z.shape[0]} samples, not a multiple of the {len(prompts)} prompts; give one prompt, "
                "or one per group of consecutive samples"
            )
        w = (
            self.decoder_guidance_scale
            if guidance_scale is None
            else _check_finite("guidance_scale", guidance_scale)
        )
        height_b, width_b = (int(side * self.latent_dim_scale) for side in z.shape[-2:])
        multiple = self._stage_b_multiple or 1
        if min(height_b, width_b) < 1 or height_b % multiple or width_b % multiple:
            raise ValueError(
                f"z of side {tuple(z.shape[-2:])} gives a Stage B latent of {(height_b, width_b)}, but stage_b "
                f"needs multiples of {multiple}; sample z with CascadeSampler.sample_prior at a valid image size"
            )
        device, dtype = _device_and_dtype(self.stage_b)

        with _eval_mode(self.stage_b, self.stage_a, self.text_encoder_b):
            cond, uncond = self._encode_text(
                self.text_encoder_b,
                "text_encoder_b",
                self._stage_b_text_width,
                "stage_b's clip_embd",
                prompts,
                negatives,
                z.shape[0] // len(prompts),
                guided=w > 1,
            )
            dtype = dtype or cond.dtype
            device = device or cond.device
            cond, uncond = _move(cond, device, dtype), _move(uncond, device, dtype)
            effnet = z.to(device=device, dtype=dtype)
            x_T = draw_noise(
                (z.shape[0], STAGE_B_LATENT_CHANNELS, height_b, width_b), generator, device, dtype
            )
            t_grid = resolve_t_grid(self.decoder_t_grid, self.decoder_steps, device=device)
            model_fn = partial(
                _guided,
                self.stage_b,
                cond={"effnet": effnet, "clip": cond},
                uncond={"effnet": torch.zeros_like(effnet), "clip": uncond} if w > 1 else None,
                w=w,
            )
            latents = sample(
                model_fn,
                x_T,
                t_grid,
                self.sampler,
                generator=generator,
                eta=self.eta,
                progress=self.progress,
                desc="Stage B",
                s=self.decoder_schedule_s,
            )
            # The v2 hand-off (REFERENCE.md): Stage B models ℓ/0.3764, Stage A decodes 0.3764·ℓ.
            a_device, a_dtype = _device_and_dtype(self.stage_a)
            latents = self.vqgan_scale_factor * latents
            latents = _move(latents, a_device or latents.device, a_dtype or latents.dtype)
            images = _tensor(self.stage_a.decode(latents), "stage_a.decode")
        return images.clamp(0, 1)

    def __call__(
        self,
        prompts: str | Sequence[str],
        height: int,
        width: int,
        generator: Generators = None,
        num_images_per_prompt: int = 1,
        negative_prompts: str | Sequence[str] | None = None,
    ) -> torch.Tensor:
        """Captions → images ``[len(prompts)·n, 3, height, width]`` in [0, 1] (C → B → A).

        One generator drives both halves in order (Stage C's noise, then Stage B's), as diffusers'
        combined pipeline does. Sizes that are not multiples of 128 come back at the cascade's
        natural size (4·int(ceil(side/42.67)·10.67)) with a warning.
        """
        prompts = _check_prompts(prompts)
        z = self.sample_prior(prompts, height, width, generator, num_images_per_prompt, negative_prompts)
        images = self.sample_decoder(z, prompts, generator, negative_prompts)
        if tuple(images.shape[-2:]) != (height, width):
            warnings.warn(
                f"the cascade produced {tuple(images.shape[-2:])} images for a requested {(height, width)}: "
                "its latent sizes round the request (ceil(side/42.67), int(·10.67)); ask for multiples of "
                "128 to get the exact size",
                stacklevel=2,
            )
        return images

    # ----- text --------------------------------------------------------------------------------
    def _encode_text(
        self,
        encoder: TextEncoderFn,
        encoder_name: str,
        expected_width: int | None,
        expected_name: str,
        prompts: list[str],
        negatives: list[str] | None,
        repeats: int,
        guided: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Conditional (and, when guided, unconditional) text states ``[len(prompts)·repeats, L, D]``.

        The two are encoded by separate calls, as the public pipelines do, and each prompt's states
        are repeated for its ``repeats`` consecutive images.
        """
        cond = self._hidden(encoder, encoder_name, prompts, expected_width, expected_name)
        uncond = None
        if guided:
            # Unconditional = the empty caption, the same "" that replaced 5% of training captions.
            uncond = self._hidden(
                encoder, encoder_name, negatives or [""] * len(prompts), expected_width, expected_name
            )
            uncond = uncond.repeat_interleave(repeats, dim=0)
        return cond.repeat_interleave(repeats, dim=0), uncond

    @staticmethod
    def _hidden(
        encoder: TextEncoderFn,
        encoder_name: str,
        captions: list[str],
        expected_width: int | None,
        expected_name: str,
    ) -> torch.Tensor:
        output = encoder(captions)
        if not isinstance(output, (tuple, list)) or len(output) != 2:
            raise TypeError(
                f"{encoder_name} must return (hidden [B, L, D], pooled [B, D]) for a list of captions, "
                f"got {type(output).__name__}"
            )
        hidden = output[0]
        if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3 or hidden.shape[0] != len(captions):
            shape = tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__
            raise ValueError(
                f"{encoder_name} returned hidden states {shape}; expected [{len(captions)}, L, D]"
            )
        if expected_width is not None and hidden.shape[-1] != expected_width:
            raise ValueError(
                f"{encoder_name} returns {hidden.shape[-1]}-wide text states but {expected_name} is "
                f"{expected_width}; pair each stage with the text encoder it was trained with "
                "(paper: ViT-bigG-14 (1280) for Stage C, ViT-H-14 (1024) for Stage B)"
            )
        return hidden


def _guided(
    model: Callable[..., Any],
    x: torch.Tensor,
    r: torch.Tensor,
    cond: dict[str, torch.Tensor],
    uncond: dict[str, torch.Tensor | None] | None,
    w: float,
) -> torch.Tensor:
    """ε of ``model`` at (x, r) with classifier-free guidance; the model may return ``.sample``."""
    return cfg_eps(lambda x_, r_, **c: _tensor(model(x_, r_, **c), "the stage"), x, r, cond, uncond, w)


def _tensor(output: Any, what: str) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    sample_ = getattr(output, "sample", None)
    if isinstance(sample_, torch.Tensor):
        return sample_
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"{what} must return a tensor (or an object with .sample), got {type(output).__name__}")


def _move(x: torch.Tensor | None, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
    return None if x is None else x.to(device=device, dtype=dtype)


def _check_prompts(prompts: str | Sequence[str]) -> list[str]:
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise ValueError("prompts must be a non-empty list of captions (use [''] for unconditional samples)")
    bad = [p for p in prompts if not isinstance(p, str)]
    if bad:
        raise TypeError(f"every prompt must be a str, got {type(bad[0]).__name__}: {bad[0]!r}")
    return list(prompts)


def _check_negative_prompts(negative_prompts: str | Sequence[str] | None, count: int) -> list[str] | None:
    if negative_prompts is None:
        return None
    if isinstance(negative_prompts, str):
        return [negative_prompts] * count
    negatives = _check_prompts(negative_prompts)
    if len(negatives) != count:
        raise ValueError(
            f"negative_prompts has {len(negatives)} captions for {count} prompts; give one string or one per prompt"
        )
    return negatives


def _check_positive_int(name: str, value: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _check_finite(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _first_parameter(module: Any) -> torch.Tensor | None:
    if isinstance(module, nn.Module):
        return next(module.parameters(), None)
    return None


def _device_and_dtype(module: Any) -> tuple[torch.device | None, torch.dtype | None]:
    parameter = _first_parameter(module)
    return (None, None) if parameter is None else (parameter.device, parameter.dtype)


def _in_features(module: Any, pattern: str) -> int | None:
    """Input width of the first weight whose state-dict name matches ``pattern`` (None if absent)."""
    if not isinstance(module, nn.Module):
        return None
    regex = re.compile(pattern)
    for name, parameter in module.named_parameters():
        if regex.fullmatch(name) and parameter.dim() >= 2:
            return int(parameter.shape[1])
    return None


def _stage_b_size_multiple(stage_b: Any) -> int | None:
    """Stage B's latent side must be a multiple of patch size × 2^(levels − 1) (its down path halves
    the patched grid at every level after the first and its up path does not resize to match)."""
    embedding = getattr(stage_b, "embedding", None)
    down_blocks = getattr(stage_b, "down_blocks", None)
    try:
        patch = int(embedding[0].downscale_factor)
        levels = len(down_blocks)
    except (TypeError, AttributeError, IndexError):
        return None
    return patch * 2 ** (levels - 1)


def _stage_a_scale_factor(stage_a: Any) -> float:
    # diffusers keeps it in .config (and deprecates the attribute); our StageA has the attribute.
    config = getattr(stage_a, "config", None)
    scale = config.get("scale_factor") if isinstance(config, dict) else getattr(config, "scale_factor", None)
    if scale is None:
        scale = getattr(stage_a, "scale_factor", None)
    if scale is None:
        raise ValueError(
            "stage_a has no scale_factor (nor config.scale_factor); pass vqgan_scale_factor=0.3764 "
            "(REFERENCE.md hand-offs) or a StageA/PaellaVQModel"
        )
    return float(scale)


@contextmanager
def _eval_mode(*modules: Any) -> Iterator[None]:
    """Run with every module in eval mode (no dropout in Stage B/C), restoring training flags after."""
    # Per submodule, so a module whose parts were in mixed modes (a frozen encoder inside a
    # training wrapper) comes back exactly as it was.
    flags = [(sub, sub.training) for m in modules if isinstance(m, nn.Module) for sub in m.modules()]
    for module, _ in flags:
        module.training = False
    try:
        yield
    finally:
        for module, was_training in flags:
            module.training = was_training


def check_cascade_configs(
    configs: dict[str, dict[str, Any]],
    *,
    compressor: dict[str, Any] | None = None,
    text_widths: dict[str, int] | None = None,
    source: str = "the cascade",
) -> None:
    """Refuse three stage configs (``{"a": …, "b": …, "c": …}``, constructor kwargs) that cannot run as one
    cascade, before any weight is read: the latents each stage hands to the next must have the channels the
    next one takes (and the text states the widths the stages cross-attend to, when ``text_widths`` gives
    them: ``{"b": CLIP-H width, "c": CLIP-bigG width}``)."""
    a, b, c = configs["a"], configs["b"], configs["c"]
    problems = []
    injects = any(b.get("inject_effnet", [True]))  # without injection Stage B never reads z (diffusers alike)
    if injects and c.get("c_in") != b.get("effnet_embd"):
        problems.append(
            f"Stage C samples {c.get('c_in')}-channel semantic latents but Stage B's effnet mappers take "
            f"effnet_embd={b.get('effnet_embd')}"
        )
    if injects and compressor is not None and compressor.get("c_latent", b.get("effnet_embd")) != b.get("effnet_embd"):
        problems.append(
            f"the compressor writes c_latent={compressor.get('c_latent')} channels but Stage B takes "
            f"effnet_embd={b.get('effnet_embd')}"
        )
    if b.get("c_in") != a.get("latent_channels"):
        problems.append(
            f"Stage B models {b.get('c_in')}-channel latents but Stage A's are {a.get('latent_channels')}-channel"
        )
    for stage, key in (("b", "clip_embd"), ("c", "c_cond")):
        width = (text_widths or {}).get(stage)
        if width is not None and configs[stage].get(key) != width:
            problems.append(f"Stage {stage.upper()} cross-attends to {key}={configs[stage].get(key)} but its text "
                            f"encoder is {width} wide")
    if problems:
        raise ValueError(f"{source} cannot run as one cascade: " + "; ".join(problems))
