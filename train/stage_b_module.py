"""Stage B: the DiffNeXt latent-diffusion decoder (paper §3, Stage B).

Diffusion runs in Stage A's continuous latent divided by its scale factor (v2: Stage A decodes
0.3764·ℓ). Conditioning: the semantic compressor, trained jointly from ImageNet init with its own
learning rate, and CLIP-H per-token text states. Per batch the compressor latents are zeroed 5% of
the time, else noised with t ~ U[0, 0.5) 30% of the time (REFERENCE.md, diffusion), so Stage B
learns to decode from imperfect Stage C samples and to run unconditionally for guidance.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from wurst.models.samplers import linear_t_grid, sample
from wurst.train.diffusion_module import DiffusionStageModule
from wurst.train.export import load_network, require_export
from wurst.train.networks import instantiate_network, network_config
from wurst.train.sync_batchnorm import convert_to_sync_batchnorm, revert_sync_batchnorm


class StageBModule(DiffusionStageModule):
    def __init__(
        self,
        network: Mapping[str, Any],
        compressor: Mapping[str, Any],
        text_encoder: Mapping[str, Any],
        optim: Mapping[str, Any],
        ema: Mapping[str, Any] | None,
        diffusion: Mapping[str, Any],
        stage_a_export: str,
        compressor_lr: float | None = None,
        effnet_zero_prob: float = 0.05,
        effnet_noise_prob: float = 0.3,
        effnet_noise_t_max: float = 0.5,
        text_dropout: float = 0.05,
        sync_batchnorm: bool = False,
        seed: int = 0,
        log_every: int = 10,
        max_bad_steps: int = 20,
    ):
        super().__init__(
            optim=optim, ema=ema, diffusion=diffusion, log_every=log_every, seed=seed, max_bad_steps=max_bad_steps
        )
        self.save_hyperparameters()
        require_export(stage_a_export, "a", why="Stage B's targets are Stage A latents")
        self.stage_a = load_network(Path(stage_a_export)).eval().requires_grad_(False)
        self.compressor_config = network_config(compressor)
        self.compressor = instantiate_network(compressor)
        self.text_encoder = instantiate_network(text_encoder)
        self.text_encoder.eval().requires_grad_(False)
        self.network = instantiate_network(network)
        self.compressor_lr = compressor_lr
        self.effnet_zero_prob = float(effnet_zero_prob)
        self.effnet_noise_prob = float(effnet_noise_prob)
        self.effnet_noise_t_max = float(effnet_noise_t_max)
        self.text_dropout = float(text_dropout)
        self.sync_batchnorm = bool(sync_batchnorm)
        self.replaced_batchnorms: dict[str, torch.nn.Module] = {}
        self.init_ema()

    def setup(self, stage: str) -> None:
        # Before Lightning wraps the module in DDP: the compressor, trained jointly, normalises with the
        # global batch's statistics (the official script's SyncBatchNorm; train/sync_batchnorm.py).
        if stage == "fit" and self.sync_batchnorm and self.trainer.world_size > 1:
            device_type = self.trainer.strategy.root_device.type
            self.replaced_batchnorms = convert_to_sync_batchnorm(self.compressor, device_type)

    def teardown(self, stage: str) -> None:
        revert_sync_batchnorm(self.compressor, self.replaced_batchnorms)
        self.replaced_batchnorms = {}

    def train(self, mode: bool = True):
        super().train(mode)
        self.stage_a.eval()
        self.text_encoder.eval()
        return self

    def trainable_param_groups(self) -> list[dict[str, Any]]:
        groups = [{"params": [p for p in self.network.parameters() if p.requires_grad]}]
        compressor_group: dict[str, Any] = {"params": [p for p in self.compressor.parameters() if p.requires_grad]}
        if self.compressor_lr is not None:
            compressor_group["lr"] = float(self.compressor_lr)
        groups.append(compressor_group)
        return groups

    def condition_latents(self, z: torch.Tensor) -> torch.Tensor:
        """The per-batch zero / noise augmentation of the compressor latents ``[B, 16, h, w]``.

        Zeroing multiplies by 0 instead of replacing ``z``: the compressor stays in the autograd graph
        (its gradient is zero for that batch), so under DDP every rank produces a gradient for every
        compressor parameter whatever its own draw was, and the gradient buckets stay in step.
        The draws (and the RNG they consume) are those of the per-batch rule in REFERENCE.md.
        """
        zero = torch.rand(()).item() < self.effnet_zero_prob
        if not zero and torch.rand(()).item() < self.effnet_noise_prob:
            t = torch.rand(z.shape[0], device=z.device) * self.effnet_noise_t_max
            z = self.diffusion.add_noise(z, t, torch.randn_like(z))
        return z * 0.0 if zero else z

    def diffusion_inputs(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, dict[str, Any], int]:
        images = batch["images"]
        batch_size = images.shape[0]
        with torch.no_grad():
            x0 = self.stage_a.encode(images).float() / float(self.stage_a.scale_factor)
        z = self.compressor(batch["compressor_images"])
        effnet = self.condition_latents(z)
        captions = list(batch["captions"])
        if torch.rand(()).item() < self.text_dropout:
            captions = [""] * batch_size
        with torch.no_grad():
            clip = self.text_encoder(captions)[0]
        return x0, {"effnet": effnet, "clip": clip.to(x0.dtype)}, batch_size

    @torch.no_grad()
    def preview(self, batch: Mapping[str, Any], prompts: list[str], steps: int = 12) -> torch.Tensor:
        """Originals (top row) over Stage B's decodes of their compressor latents (12 DDPM steps)."""
        images = batch["images"]
        z = self.compressor(batch["compressor_images"])
        clip = self.text_encoder(list(batch["captions"]))[0].to(images.dtype)
        net = self.export_network()
        down = self.stage_a.downscale
        x_T = torch.randn(images.shape[0], self.stage_a.latent_channels, images.shape[-2] // down,
                          images.shape[-1] // down, device=images.device)
        latents = sample(lambda x, r: net(x, r, effnet=z, clip=clip), x_T, linear_t_grid(steps, device=images.device))
        decoded = self.stage_a.decode(latents * float(self.stage_a.scale_factor))
        return torch.cat([images, decoded.clamp(0, 1)])

    def export_networks(self) -> dict[str, tuple[torch.nn.Module, dict[str, Any]]]:
        return {"compressor": (self.compressor, self.compressor_config)}
