"""What Stage B and Stage C training share: ε-prediction with the p2-weighted loss, the optimiser
recipe, linear warm-up, EMA, gradient-norm logging and the export of (EMA) weights.

The pieces Stage A uses too live in modules of their own: seeding (train/seeding.py), global-batch
statistics (train/global_stats.py), the non-finite guard (train/non_finite.py), networks from configs
(train/networks.py), EMA (train/ema.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from torch import nn

from wurst.models.diffusion import DiffusionSettings
from wurst.train.ema import EMA
from wurst.train.non_finite import NonFiniteGuard
from wurst.train.recipe import build_optimizer, linear_warmup
from wurst.train.seeding import seed_step


class DiffusionStageModule(L.LightningModule):
    """Base for the two diffusion stages. Subclasses set ``self.network`` and implement
    :meth:`diffusion_inputs` returning ``(x0, conditioning kwargs, batch_size)``."""

    network: nn.Module

    def __init__(
        self,
        optim: Mapping[str, Any],
        ema: Mapping[str, Any] | None,
        diffusion: Mapping[str, Any],
        log_every: int = 10,
        seed: int = 0,
        max_bad_steps: int = 20,
    ):
        super().__init__()
        self.seed = int(seed)
        self.optim_cfg = dict(optim)
        self.ema_cfg = dict(ema) if ema else None
        self.diffusion_cfg = dict(diffusion)
        # conf/diffusion's schedule, training-t and p2 numbers, read once (models/diffusion.py).
        self.diffusion = DiffusionSettings.from_config(self.diffusion_cfg)
        self.log_every = log_every
        self.ema: EMA | None = None
        self.non_finite = NonFiniteGuard(max_bad_steps)

    # -- setup -------------------------------------------------------------------------------------
    def init_ema(self) -> None:
        if self.ema_cfg and self.ema_cfg.get("enabled", True):
            self.ema = EMA(
                self.network,
                start=int(self.ema_cfg["start"]),
                every=int(self.ema_cfg["every"]),
                beta=float(self.ema_cfg["beta"]),
            )

    def trainable_param_groups(self) -> list[dict[str, Any]]:
        return [{"params": [p for p in self.network.parameters() if p.requires_grad]}]

    def configure_optimizers(self):
        optimizer = build_optimizer(self.trainable_param_groups(), self.optim_cfg)
        scheduler = linear_warmup(optimizer, int(self.optim_cfg.get("warmup_steps", 0)))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- the step ----------------------------------------------------------------------------------
    def diffusion_inputs(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, dict[str, Any], int]:
        raise NotImplementedError

    def diffusion_step(self, batch: Mapping[str, Any]) -> torch.Tensor:
        x0, cond, batch_size = self.diffusion_inputs(batch)
        t = self.diffusion.training_t(batch_size, device=x0.device)
        noise = torch.randn_like(x0)
        x_t = self.diffusion.add_noise(x0, t, noise)
        eps_pred = self.network(x_t, t, **cond)
        loss, _per_sample = self.diffusion.loss(eps_pred.float(), noise.float(), t)
        mse = (eps_pred.float() - noise.float()).pow(2).mean()
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        self.log("train/mse", mse, batch_size=batch_size)
        return loss

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        return self.diffusion_step(batch)

    def on_before_optimizer_step(self, optimizer) -> None:
        if self.global_step % self.log_every == 0:
            grads = [p.grad for p in self.parameters() if p.grad is not None]
            if grads:
                norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
                self.log("train/grad_norm", norm, batch_size=1)
            self.log("train/lr", optimizer.param_groups[0]["lr"], batch_size=1)

    @property
    def skipped_steps(self) -> int:
        return self.non_finite.skipped

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.non_finite.save(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.non_finite.load(checkpoint)

    def on_train_batch_start(self, batch, batch_idx) -> None:
        accumulate = max(1, int(getattr(self.trainer, "accumulate_grad_batches", 1) or 1))
        seed_step(self.seed, self.global_step, self.global_rank, batch_idx % accumulate)
        if batch_idx % accumulate == 0:
            self.non_finite.remember_buffers(self)

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        """Runs forward + backward, then steps only when loss and gradients are finite.

        A non-finite step is skipped (gradients dropped, nothing updated, counted in
        ``train/skipped_steps``); after ``max_bad_steps`` in a row the run stops with the step and the
        last good checkpoint named. Under DDP the gradients are already all-reduced here, so every
        rank takes the same decision.
        """
        loss = optimizer_closure() if optimizer_closure is not None else None
        if not self.non_finite.step_is_finite(self, loss, self.parameters()):
            optimizer.zero_grad(set_to_none=True)
            return
        optimizer.step(closure=lambda: loss)
        # Here rather than in on_train_batch_end: callbacks (the periodic checkpoint) run before the
        # module's on_train_batch_end, and a checkpoint must hold the EMA of the step it records.
        if self.ema is not None:
            self.ema.update(self.network, self.global_step)

    # -- export ------------------------------------------------------------------------------------
    def export_network(self) -> nn.Module:
        """The weights later stages and users get: EMA when EMA is on."""
        return self.ema.shadow if self.ema is not None else self.network
