"""Stage A: the f4 VQGAN (paper §3, Stage A; "a standard VQGAN", REFERENCE.md).

Losses: reconstruction (L1 or L2) + VQ codebook/commitment + optional perceptual, and after
``disc_start`` steps a PatchGAN hinge loss whose weight adapts to the ratio of reconstruction and
adversarial gradient norms at the decoder's last layer (Esser et al., Taming Transformers).
Two optimisers (autoencoder, discriminator), so optimisation is manual; both take their gradients
from one backward pass per step, in which every parameter gets a gradient (under DDP: one gradient
all-reduce per step, and no unused parameters before ``disc_start``).

One step unit, as in Stages B and C: a step is one batch, one update of the autoencoder. ``max_steps``,
``disc_start``, EMA, the seeding and ``log_every`` all count it (Lightning's ``global_step`` counts every
optimizer step; the discriminator's update is therefore taken on the bare torch optimizer, so that it
does not count a second time). A step with a non-finite loss or gradients is skipped and counted, and
``max_bad_steps`` of them in a row stop the run (train/non_finite.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F

from wurst.models.patch_discriminator import PatchDiscriminator, hinge_d_loss, hinge_g_loss
from wurst.train.ema import EMA
from wurst.train.global_stats import global_mean_std
from wurst.train.networks import instantiate_network
from wurst.train.non_finite import NonFiniteGuard
from wurst.train.recipe import build_optimizer, linear_warmup
from wurst.train.seeding import seed_step
from wurst.train.sync_batchnorm import convert_to_sync_batchnorm, revert_sync_batchnorm


class StageAModule(L.LightningModule):
    def __init__(
        self,
        network: Mapping[str, Any],
        optim: Mapping[str, Any],
        discriminator: Mapping[str, Any],
        ema: Mapping[str, Any] | None = None,
        reconstruction: str = "l1",
        vq_weight: float = 1.0,
        perceptual_weight: float = 0.0,
        perceptual_weights: str | None = "imagenet",
        disc_start: int = 1000,
        disc_weight: float = 0.5,
        disc_lr: float | None = None,
        grad_clip: float | None = 1.0,
        measure_scale_factor: bool = True,
        sync_batchnorm: bool = False,
        seed: int = 0,
        log_every: int = 10,
        max_bad_steps: int = 20,
    ):
        super().__init__()
        self.save_hyperparameters()
        if int(log_every) < 1:
            raise ValueError(f"stage.module.log_every={log_every} must be ≥ 1 (steps between codebook statistics)")
        self.non_finite = NonFiniteGuard(max_bad_steps)
        self.automatic_optimization = False
        if reconstruction not in ("l1", "l2"):
            raise ValueError(f"stage.reconstruction={reconstruction!r}: use 'l1' or 'l2'")
        self.network = instantiate_network(network)
        self.discriminator = PatchDiscriminator(**dict(discriminator))
        self.optim_cfg = dict(optim)
        self.perceptual = None
        if perceptual_weight > 0:
            from wurst.models.perceptual import PerceptualLoss

            self.perceptual = PerceptualLoss(perceptual_weights)
        self.ema = (
            EMA(self.network, int(ema["start"]), int(ema["every"]), float(ema["beta"]))
            if ema and ema.get("enabled", True) else None
        )
        self.seed = seed
        self.measure_scale_factor = bool(measure_scale_factor)
        self.register_buffer("latent_std", torch.ones(1))
        self.replaced_batchnorms: dict[str, torch.nn.Module] = {}

    def setup(self, stage: str) -> None:
        precision = str(self.trainer.precision)
        if stage == "fit" and "16" in precision and "bf16" not in precision:
            # The discriminator steps on the bare optimizer (one step unit); fp16's loss scaler would not
            # unscale its gradients. bf16 needs no scaler.
            raise ValueError(
                f"Stage A trains in fp32 or bf16-mixed, not trainer.precision={precision}; use bf16-mixed"
            )
        # Before Lightning wraps the module in DDP: the latent BatchNorm normalises with the global
        # batch's statistics, identical on every rank (train/sync_batchnorm.py).
        if stage == "fit" and self.hparams.sync_batchnorm and self.trainer.world_size > 1:
            device_type = self.trainer.strategy.root_device.type
            self.replaced_batchnorms = convert_to_sync_batchnorm(self.network, device_type)

    def teardown(self, stage: str) -> None:
        revert_sync_batchnorm(self.network, self.replaced_batchnorms)
        self.replaced_batchnorms = {}

    def configure_optimizers(self):
        opt_ae = build_optimizer([{"params": self.network.parameters()}], self.optim_cfg)
        disc_cfg = dict(self.optim_cfg)
        if self.hparams.disc_lr is not None:
            disc_cfg["lr"] = self.hparams.disc_lr
        opt_d = build_optimizer([{"params": self.discriminator.parameters()}], disc_cfg)
        warmup = int(self.optim_cfg.get("warmup_steps", 0))
        return [opt_ae, opt_d], [linear_warmup(opt_ae, warmup), linear_warmup(opt_d, warmup)]

    def last_layer_weight(self) -> torch.Tensor:
        convs = [m for m in self.network.modules() if isinstance(m, torch.nn.Conv2d)]
        return convs[-1].weight

    def adaptive_weight(self, rec_loss: torch.Tensor, g_loss: torch.Tensor) -> torch.Tensor:
        last = self.last_layer_weight()
        rec_grad = torch.autograd.grad(rec_loss, last, retain_graph=True)[0]
        g_grad = torch.autograd.grad(g_loss, last, retain_graph=True)[0]
        weight = rec_grad.norm() / (g_grad.norm() + 1e-4)
        return weight.clamp(0.0, 1e4).detach() * self.hparams.disc_weight

    def discriminate_fixed(self, images: torch.Tensor) -> torch.Tensor:
        """The discriminator's logits for ``images`` with its weights detached: the generator's
        adversarial term sends gradients to the autoencoder only."""
        weights = {name: p.detach() for name, p in self.discriminator.named_parameters()}
        return torch.func.functional_call(self.discriminator, weights, (images,))

    def on_train_batch_start(self, batch, batch_idx) -> None:
        seed_step(self.seed, self.global_step, self.global_rank)
        self.non_finite.remember_buffers(self)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.non_finite.save(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.non_finite.load(checkpoint)

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        images = batch["images"]
        opt_ae, opt_d = self.optimizers()
        sched_ae, sched_d = self.lr_schedulers()
        step = self.global_step  # steps done before this one (the autoencoder's updates)
        adversarial = step >= self.hparams.disc_start

        latents = self.network.encode(images)
        quantized, vq_loss, indices = self.network.quantize(latents)
        recon = self.network.decode(quantized)
        _, batch_std = global_mean_std(latents)  # of the global batch: the same on every rank
        with torch.no_grad():  # running latent std: the scale factor Stage B divides by
            self.latent_std.lerp_(batch_std.reshape(1), 0.02 if step > 0 else 1.0)
        if self.hparams.reconstruction == "l1":
            rec_loss = F.l1_loss(recon, images)
        else:
            rec_loss = F.mse_loss(recon, images)
        if self.perceptual is not None:
            p_loss = self.perceptual(recon, images)
            rec_loss = rec_loss + self.hparams.perceptual_weight * p_loss
            self.log("train/perceptual_loss", p_loss, batch_size=images.shape[0])
        loss = rec_loss + self.hparams.vq_weight * vq_loss
        if adversarial:
            g_loss = hinge_g_loss(self.discriminate_fixed(recon))
            d_weight = self.adaptive_weight(rec_loss, g_loss)
            loss = loss + d_weight * g_loss
            d_loss = hinge_d_loss(self.discriminator(images), self.discriminator(recon.detach()))
            self.log("train/g_loss", g_loss, batch_size=images.shape[0])
            self.log("train/d_loss", d_loss, batch_size=images.shape[0])
        else:
            # Before disc_start the discriminator takes part with weight 0 and no forward pass: its
            # gradient is zero, but it has one, so DDP (find_unused_parameters=False) reduces every
            # bucket in every step. Its optimiser does not step until disc_start.
            d_loss = torch.stack([p.sum() for p in self.discriminator.parameters()]).sum() * 0.0
        opt_ae.zero_grad(set_to_none=True)
        opt_d.zero_grad(set_to_none=True)
        # The autoencoder's gradients come from `loss` only (recon is detached in d_loss), the
        # discriminator's from `d_loss` only (its weights are detached in g_loss): one backward for both.
        self.manual_backward(loss + d_loss)
        if not self.non_finite.step_is_finite(self, loss + d_loss, self.parameters()):
            # Skipped as in Stages B and C: no weight, EMA or discriminator update, but the step counts
            # (an optimizer step without gradients changes nothing), so the schedule goes on.
            opt_ae.zero_grad(set_to_none=True)
            opt_d.zero_grad(set_to_none=True)
            opt_ae.step()
            sched_ae.step()
            return
        if self.hparams.grad_clip:
            self.clip_gradients(opt_ae, gradient_clip_val=self.hparams.grad_clip, gradient_clip_algorithm="norm")
        opt_ae.step()  # the one step Lightning counts (global_step)
        sched_ae.step()
        if adversarial:
            opt_d.optimizer.step()  # the bare torch optimizer: not a second global step
            sched_d.step()

        if self.ema is not None:
            self.ema.update(self.network, step + 1)
        self.log("train/loss", loss, prog_bar=True, batch_size=images.shape[0])
        self.log("train/rec_loss", rec_loss, prog_bar=True, batch_size=images.shape[0])
        self.log("train/vq_loss", vq_loss, batch_size=images.shape[0])
        if step % self.hparams.log_every == 0:
            perplexity, dead = self.network.codebook_usage(indices)
            self.log("train/codebook_perplexity", perplexity, batch_size=images.shape[0])
            self.log("train/codebook_dead_fraction", dead, batch_size=images.shape[0])

    @torch.no_grad()
    def preview(self, batch: Mapping[str, Any], prompts: list[str]) -> torch.Tensor:
        """Originals (top row) over their quantized reconstructions by the export network."""
        images = batch["images"]
        recon = self.export_network()(images)[0]
        return torch.cat([images, recon.clamp(0, 1)])

    def export_network(self) -> torch.nn.Module:
        return self.ema.shadow if self.ema is not None else self.network

    def export_config_updates(self) -> dict[str, Any]:
        """Stage B diffuses ``latent / scale_factor``; with ``measure_scale_factor`` it is the latents'
        measured std (running average over training), so Stage B sees unit-variance data — the role
        0.3764 plays for the public v2 VQGAN."""
        return {"scale_factor": round(float(self.latent_std), 6)} if self.measure_scale_factor else {}

