"""The callbacks every stage run gets: progress bar, carbon ledger, preview grids, data counts, and
the last step's logs."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import hydra.utils
import lightning as L
import torch
import torch.distributed
from lightning.pytorch.callbacks import TQDMProgressBar
from omegaconf import DictConfig, OmegaConf

from wurst.train.previews import PreviewGrid


def is_last_step(trainer: L.Trainer, upcoming: bool = False) -> bool:
    """Whether this batch (after its optimizer step) or, with ``upcoming``, the optimizer step about
    to run, is the run's last (``trainer.max_steps``)."""
    max_steps = trainer.max_steps
    if max_steps is None or max_steps <= 0:
        return False
    return trainer.global_step + (1 if upcoming else 0) >= max_steps


def logs_this_step(trainer: L.Trainer) -> bool:
    """Whether Lightning writes this step's logs (``log_every_n_steps``; the same answer on every rank)."""
    connector = getattr(trainer, "_logger_connector", None)
    return bool(getattr(connector, "should_update_logs", True))


class DataCounts(L.Callback):
    """Logs ``data/*``: what the data stream read, kept, filtered and skipped, as running totals since
    the start of the run (all ranks together), on every step Lightning writes logs and on the last one.

    The totals are the data module's ``stats``, which are counted as each batch is trained on and
    travel in the checkpoint with the stream position, so a resumed run continues them; the final
    values reach ``metrics.json``, the export's provenance and ``pipeline.json`` through the trainer's
    callback metrics. Every stage's data module has them, so Stage A, B and C all log them.
    ``provenance()`` gives the export the same all-rank totals (a rank's data module has its share only).
    """

    def __init__(self) -> None:
        self.totals: Counter[str] | None = None  # all ranks, as last logged
        self._datamodule: Any = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._datamodule = trainer.datamodule
        stats = getattr(trainer.datamodule, "stats", None) if trainer.datamodule is not None else None
        if stats is None or not (logs_this_step(trainer) or is_last_step(trainer)):
            return
        counts = Counter(stats.counts)
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            # Each rank counts its own share of the stream; the kinds seen may differ by rank, so the
            # counters travel whole (one small collective, on log steps only, which all ranks share).
            gathered: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, dict(counts))
            counts = sum((Counter(c) for c in gathered), Counter())
        self.totals = counts
        pl_module.log_dict({f"data/{kind}": float(n) for kind, n in sorted(counts.items())}, batch_size=1)

    def provenance(self) -> dict[str, Any]:
        """``{"dataset": {shards, shard_list_hash, counts}}`` with the all-rank totals as ``counts``."""
        if self._datamodule is None or self.totals is None:
            return {}
        from wurst.train.run_stage import data_provenance

        dataset = data_provenance(self._datamodule).get("dataset", {})
        return {"dataset": {**dataset, "counts": dict(sorted(self.totals.items()))}}


class LastStepLogs(L.Callback):
    """The last step is always logged: ``train/lr`` and ``train/grad_norm`` at the last optimizer step
    too, and that step's logs written to the loggers (``metrics.csv``) even off ``log_every_n_steps``.

    The diffusion modules log lr and grad norm every ``log_every`` steps only, so the final metrics
    (the sweep summary, ``metrics.json``, provenance) showed the values of the last multiple of
    ``log_every``, step 0 in a short run. Stage A (manual optimisation, two optimisers) logs neither.
    Put it after the callbacks whose last-step logs it should write (``DataCounts``).
    """

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        if not pl_module.automatic_optimization or not is_last_step(trainer, upcoming=True):
            return
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        if grads:
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
            pl_module.log("train/grad_norm", norm, batch_size=1)
        pl_module.log("train/lr", optimizer.param_groups[0]["lr"], batch_size=1)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        connector = getattr(trainer, "_logger_connector", None)
        if connector is None or not is_last_step(trainer) or logs_this_step(trainer):
            return
        connector.log_metrics(connector.metrics["log"])  # what Lightning does on a log step


def build_callbacks(cfg: DictConfig, run_dir: Path) -> list[L.Callback]:
    callbacks: list[L.Callback] = []
    if cfg.callbacks.get("progress_bar", True):
        callbacks.append(TQDMProgressBar(refresh_rate=max(1, int(cfg.trainer.get("log_every_n_steps", 10)) // 2)))
    accounting = cfg.get("accounting")
    if accounting is not None and accounting.get("_target_"):
        callbacks.append(hydra.utils.instantiate(OmegaConf.to_container(accounting, resolve=True)))
    callbacks += [DataCounts(), LastStepLogs()]
    callbacks.append(
        PreviewGrid(run_dir / "samples", every_n_steps=int(cfg.get("sample_every") or 0), prompts=list(cfg.samples_prompts))
    )
    return callbacks
