"""``CarbonLedger``: a Lightning callback that records what a stage run costs (issue 5).

Each rank times its own fit loop (``on_train_start`` → ``on_train_end``) and meters its own device
(NVML energy counter, else board power × time, see ``power.py``). At every epoch end, checkpoint and
the end of training the ranks' figures are gathered, so the ledger's device-hours are the sum over
ranks. The ledger is the callback's checkpoint state: a resumed run or a SLURM requeue starts from
the checkpoint's figures and adds the new segment instead of restarting from zero. Time after the
last checkpoint of a killed job is lost with that job (Lightning's SLURM requeue handler saves a
checkpoint first, so a requeue loses nothing).

Checkpoints must be written on every rank (``trainer.save_checkpoint`` on all processes, as Lightning
requires), because taking the ledger's state gathers across ranks.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info

from wurst.train.accounting.carbon import co2_kg, default_pue, resolve_carbon_intensity
from wurst.train.accounting.ledger import MIXED, POWER_SOURCES, Ledger
from wurst.train.accounting.power import BoardPowerMeter, NvmlEnergyMeter, open_energy_meter


def batch_size_of(batch: Any) -> int:
    """Per-device batch size: ``len(batch["captions"])``, else the first tensor's ``shape[0]``."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.ndim > 0 else 1
    if isinstance(batch, Mapping):
        if "captions" in batch and isinstance(batch["captions"], Sequence):
            return len(batch["captions"])
        items = list(batch.values())
    elif isinstance(batch, Sequence) and not isinstance(batch, (str, bytes)):
        items = list(batch)
    else:
        items = []
    for item in items:
        if isinstance(item, (torch.Tensor, Mapping)) or (
            isinstance(item, Sequence) and not isinstance(item, (str, bytes))
        ):
            try:
                return batch_size_of(item)
            except ValueError:
                continue
    raise ValueError(
        f"CarbonLedger cannot find the batch size in a batch of type {type(batch).__name__} (no 'captions' "
        "list and no tensor); give the LightningModule an int attribute `samples_per_step` (samples per "
        "optimizer step over all ranks) so samples are counted from steps"
    )


@dataclass
class _Segment:
    """This rank's share of one fit run (from on_train_start until now)."""

    start: float
    start_step: int
    meter: BoardPowerMeter | NvmlEnergyMeter
    local_samples: int = 0
    last_logged_step: int = -1


class CarbonLedger(pl.Callback):
    """Device-hours, energy, CO2 and samples of a stage run, kept in its checkpoints.

    Args:
        carbon_intensity_kg_per_kwh: grid intensity (kg CO2eq/kWh); or give ``region``.
        region: a preset in conf/accounting/tables/carbon.yaml (default there: aws-us-east-1, 0.37).
        pue: power usage effectiveness of the site (default there: 1.0, as the paper's figure).
        device_watts: force this board power for every device (skips NVML and the table).
        fallback_watts: per-device wattage for CPU runs and accelerators the table lacks.
        use_nvml: read NVML total-energy counters where the GPU has them.
        log_every_n_steps: how often to send running figures to the loggers (default: the trainer's).

    Samples: each rank counts its batches' sizes (``batch_size_of``) and the ranks' counts are summed;
    a module with an int ``samples_per_step`` attribute (global samples per optimizer step) is counted
    as ``samples_per_step`` × optimizer steps instead.
    """

    def __init__(
        self,
        carbon_intensity_kg_per_kwh: float | None = None,
        region: str | None = None,
        pue: float | None = None,
        device_watts: float | None = None,
        fallback_watts: float | None = None,
        use_nvml: bool = True,
        log_every_n_steps: int | None = None,
    ) -> None:
        super().__init__()
        self.carbon_intensity_kg_per_kwh = resolve_carbon_intensity(carbon_intensity_kg_per_kwh, region)
        self.pue = default_pue() if pue is None else float(pue)
        co2_kg(0.0, self.pue, self.carbon_intensity_kg_per_kwh)  # validates pue ≥ 1 now, not mid-run
        if device_watts is not None and not device_watts > 0:
            raise ValueError(f"device_watts must be > 0 W, got {device_watts!r}; leave it null to measure")
        if fallback_watts is not None and not fallback_watts > 0:
            raise ValueError(f"fallback_watts must be > 0 W, got {fallback_watts!r}")
        if log_every_n_steps is not None and log_every_n_steps < 1:
            raise ValueError(f"log_every_n_steps must be ≥ 1, got {log_every_n_steps!r}")
        self.device_watts = device_watts
        self.fallback_watts = fallback_watts
        self.use_nvml = use_nvml
        self.log_every_n_steps = log_every_n_steps
        self._prior = Ledger()  # earlier segments (from the checkpoint this run resumed)
        self._ledger = Ledger()  # prior + this segment, as of the last gather
        self._segment: _Segment | None = None
        self._trainer: pl.Trainer | None = None

    # -- the fit loop -------------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        device = trainer.strategy.root_device
        if device.type == "cuda":
            name, index = torch.cuda.get_device_name(device), device.index or 0
        else:  # "cpu" gets the configured wattage; another accelerator type warns and gets it too
            name, index = device.type, None
        meter = open_energy_meter(
            name,
            cuda_index=index,
            device_watts=self.device_watts,
            fallback=self.fallback_watts,
            use_nvml=self.use_nvml,
        )
        self._trainer = trainer
        self._segment = _Segment(start=time.monotonic(), start_step=trainer.global_step, meter=meter)
        self._ledger = self._prior

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        segment = self._segment
        if segment is None:
            return
        if _samples_per_step(pl_module) is None:
            segment.local_samples += batch_size_of(batch)
        every = self.log_every_n_steps or trainer.log_every_n_steps
        step = trainer.global_step
        if trainer.is_global_zero and step != segment.last_logged_step and step % every == 0:
            segment.last_logged_step = step
            self._log(trainer, self._prior.add(self._estimate_segment(trainer, pl_module)))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._segment is not None:
            self._log(trainer, self._gather(trainer))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._segment is None:
            return
        ledger = self._gather(trainer)
        self._segment = None
        self._prior = ledger  # a further fit() on this trainer continues from here
        self._log(trainer, ledger)
        rank_zero_info(f"[accounting] {describe(ledger)}")

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # Other ranks may not reach this hook, so no collective: this rank's share × world size stands in
        # for the segment (what an OnExceptionCheckpoint saves next), and later state_dict calls gather nothing.
        if self._segment is not None:
            self._ledger = self._prior = self._prior.add(self._estimate_segment(trainer, pl_module))
            self._segment = None

    # -- checkpoint state ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        # Called on every rank while a checkpoint is dumped; gathering here puts all ranks' time in it.
        if self._segment is not None and self._trainer is not None:
            self._gather(self._trainer)
        return {"ledger": self._ledger.to_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._prior = Ledger.from_dict(state_dict["ledger"], source="checkpoint callbacks.CarbonLedger")
        self._ledger = self._prior

    def finalize(self) -> Ledger:
        """The run's ledger as of the end of training: the export's provenance.json "accounting"."""
        return Ledger.from_dict(self._ledger.to_dict())

    def provenance(self) -> dict[str, Any]:
        """The export's provenance.json entries: {"accounting": <ledger>, "samples_seen": <int>}."""
        ledger = self.finalize()
        return {"accounting": ledger.to_dict(), "samples_seen": ledger.samples}

    # -- figures ------------------------------------------------------------------------------
    def _gather(self, trainer: pl.Trainer) -> Ledger:
        """Sums every rank's segment (a collective: all ranks must call it) and adds the prior."""
        segment = self._segment
        assert segment is not None
        source = POWER_SOURCES.index(segment.meter.power_source)
        mine = [time.monotonic() - segment.start, segment.meter.joules(), segment.local_samples, source]
        local = torch.tensor(mine, dtype=torch.float64, device=trainer.strategy.root_device)
        ranks = trainer.strategy.all_gather(local).reshape(-1, len(mine)).cpu()
        world = ranks.shape[0]
        steps = trainer.global_step - segment.start_step
        per_step = _samples_per_step(trainer.lightning_module)
        samples = int(ranks[:, 2].sum().item()) if per_step is None else steps * per_step
        energy = float(ranks[:, 1].sum().item()) / 3.6e6
        sources = {POWER_SOURCES[int(code)] for code in ranks[:, 3].tolist()}
        this_segment = Ledger(
            device_hours=float(ranks[:, 0].sum().item()) / 3600,
            wall_hours=float(ranks[:, 0].max().item()) / 3600,
            energy_kwh=energy,
            co2_kg=co2_kg(energy, self.pue, self.carbon_intensity_kg_per_kwh),
            samples=samples,
            steps=steps,
            pue=self.pue,
            carbon_intensity_kg_per_kwh=self.carbon_intensity_kg_per_kwh,
            device_name=segment.meter.device_name,  # this rank's (rank 0's in what is saved)
            power_source=sources.pop() if len(sources) == 1 else MIXED,
            world_size=world,
            segments=1,
            per_rank=[
                {
                    "device_hours": row[0] / 3600,
                    "energy_kwh": row[1] / 3.6e6,
                    "samples": row[2] if per_step is None else samples / world,
                }
                for row in ranks.tolist()
            ],
        )
        self._ledger = self._prior.add(this_segment)
        return self._ledger

    def _estimate_segment(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Ledger:
        """This segment as this rank's share × world size: no collective (for logs between gathers)."""
        segment = self._segment
        assert segment is not None
        elapsed = time.monotonic() - segment.start
        world = trainer.world_size
        steps = trainer.global_step - segment.start_step
        per_step = _samples_per_step(pl_module)
        energy = segment.meter.joules() * world / 3.6e6
        return Ledger(
            device_hours=elapsed * world / 3600,
            wall_hours=elapsed / 3600,
            energy_kwh=energy,
            co2_kg=co2_kg(energy, self.pue, self.carbon_intensity_kg_per_kwh),
            samples=segment.local_samples * world if per_step is None else steps * per_step,
            steps=steps,
            pue=self.pue,
            carbon_intensity_kg_per_kwh=self.carbon_intensity_kg_per_kwh,
            device_name=segment.meter.device_name,
            power_source=segment.meter.power_source,
            world_size=world,
            segments=1,
        )

    def _log(self, trainer: pl.Trainer, ledger: Ledger) -> None:
        if trainer.is_global_zero:
            figures = {
                "accounting/device_hours": ledger.device_hours,
                "accounting/energy_kwh": ledger.energy_kwh,
                "accounting/co2_kg": ledger.co2_kg,
                "accounting/samples": float(ledger.samples),
                "accounting/samples_per_s": ledger.samples_per_s or 0.0,
            }
            for logger in trainer.loggers:
                logger.log_metrics(figures, step=trainer.global_step)


def _samples_per_step(pl_module: pl.LightningModule) -> int | None:
    value = getattr(pl_module, "samples_per_step", None)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"{type(pl_module).__name__}.samples_per_step must be a positive int (global samples per "
            f"optimizer step), got {value!r}"
        )
    return value


def describe(ledger: Ledger) -> str:
    """One line for the log: hours, energy, CO2, samples and throughput."""
    rate = ledger.samples_per_s
    return (
        f"{ledger.device_hours:.4g} device-hours over {ledger.world_size} rank(s) "
        f"({ledger.wall_hours:.4g} h wall, {ledger.segments} segment(s)); "
        f"{ledger.energy_kwh:.4g} kWh ({ledger.power_source}: {ledger.device_name}); "
        f"{ledger.co2_kg:.4g} kg CO2eq (PUE {ledger.pue:g} × {ledger.carbon_intensity_kg_per_kwh:g} kg/kWh); "
        f"{ledger.samples:,} samples, {ledger.steps:,} steps"
        + (f", {rate:.4g} samples/s" if rate is not None and math.isfinite(rate) else "")
    )
