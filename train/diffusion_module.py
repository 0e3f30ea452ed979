"""What Stage B and Stage C training share: ε-prediction with the p2-weighted loss, the optimiser
recipe, linear warm-up, EMA, gradient-norm logging and the export of (EMA) weights.

Each stage module builds its networks in ``__init__`` from plain config dicts (``_target_`` +
kwargs), so checkpoints hold only tensors and plain containers and load with ``weights_only=True``.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import hydra.utils
import lightning as L
import torch
from torch import nn

from wurst.models.diffusion import DiffusionSettings
from wurst.train.ema import EMA
from wurst.train.recipe import build_optimizer, linear_warmup


def seed_step(seed: int, step: int, rank: int, micro_batch: int = 0) -> None:
    """Seeds every RNG from (seed, step, rank) at the start of a step.

    Noise, timesteps, caption dropout and network dropout then depend only on where the run is, so a
    run resumed from a checkpoint continues exactly as an uninterrupted one would.
    """
    mixed = (int(seed) * 1_000_003 + int(step) * 7919 + int(rank) * 104_729 + int(micro_batch) * 31) % (2**63 - 1)
    random.seed(mixed)
    torch.manual_seed(mixed)


def global_mean_std(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (unbiased) std of ``x`` over every rank's tensor, identical on every rank.

    One process: ``x.mean(), x.std()``. Under DDP one all-reduce of (sum, sum of squares, count), so a
    statistic a stage keeps in a buffer (Stage A's latent std, Stage C's measured hand-off) is that of
    the global batch and the same on every rank, not each rank's own.
    """
    x = x.detach().float()
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()) or (
        torch.distributed.get_world_size() == 1
    ):
        return x.mean(), x.std()
    local = x.double()
    stats = torch.stack([local.sum(), local.square().sum(), torch.tensor(float(x.numel()), dtype=torch.float64,
                                                                           device=x.device)])
    torch.distributed.all_reduce(stats)
    total, squares, n = stats
    mean = total / n
    var = ((squares - n * mean.square()) / (n - 1)).clamp_min(0.0)
    return mean.float(), var.sqrt().float()


def non_finite_message(module: L.LightningModule, count: int) -> str:
    from wurst.train.checkpointing import find_resume_checkpoint

    run_dir = getattr(module.trainer, "default_root_dir", None)
    last = find_resume_checkpoint(f"{run_dir}/checkpoints") if run_dir else None
    return (
        f"{count} consecutive steps with a non-finite loss or gradients, the last at step {module.global_step}; "
        f"stopping. Last good checkpoint: {last or 'none yet'}. Lower optim.lr, check the data "
        f"(data/* skip counts) or resume from that checkpoint with resume=<path>."
    )


def instantiate_network(config: Mapping[str, Any]) -> nn.Module:
    """Builds a network from a plain ``{_target_: ..., **kwargs}`` dict."""
    return hydra.utils.instantiate(dict(config), _convert_="all")


def network_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The constructor config written to ``config.json`` (everything but Hydra's private keys)."""
    return {k: v for k, v in dict(config).items() if not (k.startswith("_") and k != "_target_")}


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
        self.max_bad_steps = int(max_bad_steps)
        self.skipped_steps = 0
        self.bad_in_a_row = 0

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
        self.log_data_stats(batch)
        return loss

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        return self.diffusion_step(batch)

    def log_data_stats(self, batch: Mapping[str, Any]) -> None:
        stats = batch.get("data_stats") if isinstance(batch, Mapping) else None
        if isinstance(stats, Mapping) and self.global_step % self.log_every == 0:
            for key, value in stats.items():
                if isinstance(value, (int, float)) or (torch.is_tensor(value) and value.numel() == 1):
                    self.log(f"data/{key}", float(value), batch_size=1, reduce_fx="sum")

    def on_before_optimizer_step(self, optimizer) -> None:
        if self.global_step % self.log_every == 0:
            grads = [p.grad for p in self.parameters() if p.grad is not None]
            if grads:
                norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
                self.log("train/grad_norm", norm, batch_size=1)
            self.log("train/lr", optimizer.param_groups[0]["lr"], batch_size=1)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["non_finite_steps"] = {"skipped": self.skipped_steps, "in_a_row": self.bad_in_a_row}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        counts = checkpoint.get("non_finite_steps", {})
        self.skipped_steps = int(counts.get("skipped", 0))
        self.bad_in_a_row = int(counts.get("in_a_row", 0))

    def on_train_batch_start(self, batch, batch_idx) -> None:
        accumulate = max(1, int(getattr(self.trainer, "accumulate_grad_batches", 1) or 1))
        seed_step(self.seed, self.global_step, self.global_rank, batch_idx % accumulate)

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        """Runs forward + backward, then steps only when loss and gradients are finite.

        A non-finite step is skipped (gradients dropped, nothing updated, counted in
        ``train/skipped_steps``); after ``max_bad_steps`` in a row the run stops with the step and the
        last good checkpoint named. Under DDP the gradients are already all-reduced here, so every
        rank takes the same decision.
        """
        loss = optimizer_closure() if optimizer_closure is not None else None
        # One host sync for the whole check: a non-finite value anywhere makes the sum non-finite.
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        flag = torch.stack(torch._foreach_norm(grads)).sum() if grads else torch.zeros((), device=self.device)
        if loss is not None:
            flag = flag + loss.detach().float().sum()
        finite = bool(torch.isfinite(flag))
        if not finite:
            self.skipped_steps += 1
            self.bad_in_a_row += 1
            optimizer.zero_grad(set_to_none=True)
            self.log("train/skipped_steps", float(self.skipped_steps), batch_size=1)
            if self.bad_in_a_row >= self.max_bad_steps:
                raise FloatingPointError(non_finite_message(self, self.bad_in_a_row))
            return
        self.bad_in_a_row = 0
        optimizer.step(closure=lambda: loss)
        # Here rather than in on_train_batch_end: callbacks (the periodic checkpoint) run before the
        # module's on_train_batch_end, and a checkpoint must hold the EMA of the step it records.
        if self.ema is not None:
            self.ema.update(self.network, self.global_step)

    # -- export ------------------------------------------------------------------------------------
    def export_network(self) -> nn.Module:
        """The weights later stages and users get: EMA when EMA is on."""
        return self.ema.shadow if self.ema is not None else self.network
