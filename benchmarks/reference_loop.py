"""The reference: diffusers' ``WuerstchenPrior`` / ``WuerstchenDiffNeXt`` trained by a plain PyTorch loop
in the style of the authors' scripts (dome272/Wuerstchen ``train_stage_C.py``, ``train_stage_B.py``).

What makes it "official style", each as those scripts do it:
- the frozen encoders run every step: Stage C's EfficientNet in fp32 under ``no_grad``, CLIP under
  bf16 autocast; Stage B's VQGAN encoder and CLIP under autocast and ``no_grad``, its EfficientNet
  trained jointly inside the autocast forward;
- bf16 ``torch.autocast`` (no compile, no channels-last), PyTorch's default AdamW (not fused), a
  linear warm-up, ``clip_grad_norm_(…, 1.0)``, ``zero_grad(set_to_none=True)``;
- an EMA copy of the network on the device, refreshed every 100 iterations;
- the per-step host reads of the scripts' progress bar / wandb logging (``loss.item()``,
  ``grad_norm.item()``; Stage B also checks ``torch.isnan(loss)`` before stepping) and a blocking
  ``images.to(device)``.
Caption dropout (5%) and Stage B's compressor-latent zero / noise augmentation draw from a host RNG
per batch, as in the scripts. On CPU autocast is off (fp32), matching our CPU precision.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Mapping
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from wurst.models.diffusion import add_noise, p2_weight, sample_training_t


def diffusers_network(stage: str, network_config: Mapping[str, Any]) -> nn.Module:
    """diffusers' class for ``stage`` ("c": WuerstchenPrior, "b": WuerstchenDiffNeXt) built from our
    network config (``_target_`` and our-only arguments such as gradient_checkpointing dropped)."""
    from diffusers.pipelines.deprecated.wuerstchen import WuerstchenDiffNeXt, WuerstchenPrior

    cls = {"c": WuerstchenPrior, "b": WuerstchenDiffNeXt}[stage]
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    return cls(**{k: v for k, v in network_config.items() if k in accepted})


class OfficialStyleLoop:
    """One training iteration per :meth:`step`, as the authors' scripts run it.

    Args:
        stage: "c" (prior on compressor latents) or "b" (decoder in Stage A's latent).
        network: the diffusers network to train.
        text_encoder: frozen; captions → (per-token states, pooled).
        device: where everything runs.
        optim: our optimiser config (lr, betas, weight_decay, eps, warmup_steps, grad_clip).
        compressor: Stage C: frozen (None when training from cached latents); Stage B: trained jointly.
        stage_a: Stage B only: the frozen VQGAN whose encoder gives the diffusion targets.
        latent_mean, latent_std: Stage C's hand-off, x0 = (z + latent_std) / latent_mean.
        ema_every, ema_start: EMA refresh period and start, in iterations (the scripts: 100, 5000).
        seed: the host RNG of the per-batch choices.
    """

    def __init__(
        self,
        stage: str,
        network: nn.Module,
        text_encoder: nn.Module,
        device: torch.device,
        optim: Mapping[str, Any],
        compressor: nn.Module | None = None,
        stage_a: nn.Module | None = None,
        latent_mean: float = 42.0,
        latent_std: float = 1.0,
        text_dropout: float = 0.05,
        effnet_zero_prob: float = 0.05,
        effnet_noise_prob: float = 0.3,
        effnet_noise_t_max: float = 0.5,
        ema_every: int = 100,
        ema_start: int = 5000,
        seed: int = 0,
    ):
        if stage not in ("b", "c"):
            raise ValueError(f"stage={stage!r}: the reference loop trains Stage 'b' or 'c'")
        if stage == "b" and (stage_a is None or compressor is None):
            raise ValueError("the Stage B reference loop needs stage_a (targets) and compressor (trained jointly)")
        self.stage, self.device = stage, torch.device(device)
        self.network = network.to(self.device).train()
        self.text_encoder = text_encoder.to(self.device).eval().requires_grad_(False)
        self.compressor = compressor.to(self.device) if compressor is not None else None
        if self.compressor is not None:
            trained = stage == "b"
            self.compressor.train(trained).requires_grad_(trained)
        self.stage_a = stage_a.to(self.device).eval().requires_grad_(False) if stage_a is not None else None
        self.latent_mean, self.latent_std = float(latent_mean), float(latent_std)
        self.text_dropout = float(text_dropout)
        self.effnet_zero_prob, self.effnet_noise_prob = float(effnet_zero_prob), float(effnet_noise_prob)
        self.effnet_noise_t_max = float(effnet_noise_t_max)
        self.ema = copy.deepcopy(self.network).eval().requires_grad_(False)
        self.ema_every, self.ema_start = int(ema_every), int(ema_start)
        self.rng = np.random.default_rng(seed)

        self.params = [p for p in self.network.parameters() if p.requires_grad]
        if stage == "b":
            self.params += [p for p in self.compressor.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.params,
            lr=float(optim["lr"]),
            betas=tuple(optim.get("betas", (0.9, 0.999))),
            weight_decay=float(optim.get("weight_decay", 0.01)),
            eps=float(optim.get("eps", 1e-8)),
        )
        warmup = max(int(optim.get("warmup_steps", 0)), 1)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: min(1.0, (s + 1) / warmup))
        self.grad_clip = float(optim.get("grad_clip", 1.0))
        self.iteration = 0
        self.logged: dict[str, float] = {}

    def autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    def captions(self, batch: Mapping[str, Any]) -> tuple[list[str], bool]:
        """The batch's captions, or all "" for 5% of batches (classifier-free guidance dropout)."""
        captions = list(batch["captions"])
        dropped = self.rng.random() < self.text_dropout
        return ([""] * len(captions) if dropped else captions), dropped

    # -- Stage C: (x_t, t, text) from images or from cached latents -----------------------------------
    def stage_c_inputs(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        captions, dropped = self.captions(batch)
        with torch.no_grad():
            if "compressor_latents" in batch:
                z = batch["compressor_latents"].to(self.device).float()
            else:
                if self.compressor is None:
                    raise ValueError("the Stage C reference got images but has no compressor; pass one")
                z = self.compressor(batch["images"].to(self.device))  # fp32, outside autocast
            if "text_hidden" in batch and not dropped:
                text = batch["text_hidden"].to(self.device).float()
            else:
                with self.autocast():
                    text = self.text_encoder(captions)[0]
            x0 = (z + self.latent_std) / self.latent_mean
        return x0, sample_training_t(x0.shape[0], device=self.device), {"c": text}

    # -- Stage B: (x_t, t, effnet, clip) ----------------------------------------------------------------
    def stage_b_conditioning(self, z: torch.Tensor) -> torch.Tensor:
        if self.rng.random() < self.effnet_zero_prob:
            return torch.zeros_like(z)
        if self.rng.random() < self.effnet_noise_prob:
            t = torch.rand(z.shape[0], device=z.device) * self.effnet_noise_t_max
            return add_noise(z, t, torch.randn_like(z))
        return z

    def stage_b_targets(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        images = batch["images"].to(self.device)
        captions, _ = self.captions(batch)
        with self.autocast(), torch.no_grad():
            clip = self.text_encoder(captions)[0]
            x0 = self.stage_a.encode(images).float() / float(self.stage_a.scale_factor)
        return x0, sample_training_t(x0.shape[0], device=self.device), clip

    # -- one iteration ----------------------------------------------------------------------------------
    def step(self, batch: Mapping[str, Any]) -> None:
        if self.stage == "c":
            x0, t, cond = self.stage_c_inputs(batch)
        else:
            x0, t, clip = self.stage_b_targets(batch)
        noise = torch.randn_like(x0)
        x_t = add_noise(x0, t, noise)
        with self.autocast():
            if self.stage == "b":
                z = self.compressor(batch["compressor_images"].to(self.device))
                cond = {"effnet": self.stage_b_conditioning(z), "clip": clip}
            pred = self.network(x_t, t, **cond)
            loss = F.mse_loss(pred.float(), noise, reduction="none").mean(dim=[1, 2, 3])
            loss_adjusted = (loss * p2_weight(t)).mean()
        if self.stage == "b" and torch.isnan(loss_adjusted):  # the Stage B script's guard (a host read)
            self.optimizer.zero_grad(set_to_none=True)
            return
        loss_adjusted.backward()
        grad_norm = nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.iteration += 1
        if self.iteration % self.ema_every == 0:
            self.update_ema()
        # The scripts' progress bar and wandb log read these every iteration.
        self.logged = {
            "loss": loss.mean().item(),
            "loss_adjusted": loss_adjusted.item(),
            "grad_norm": grad_norm.item(),
            "lr": self.optimizer.param_groups[0]["lr"],
        }

    @torch.no_grad()
    def update_ema(self, beta: float = 0.9) -> None:
        if self.iteration < self.ema_start:
            self.ema.load_state_dict(self.network.state_dict())
            return
        for ema_p, p in zip(self.ema.parameters(), self.network.parameters(), strict=True):
            ema_p.lerp_(p, 1 - beta)
