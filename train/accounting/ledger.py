"""The ledger: what a stage run cost, accumulated over resumes, ranks and (for a pipeline) stages.

A stage run's final ledger is the ``"accounting"`` object of its ``export/provenance.json``; while a
run is going, the newest checkpoint holds it (``checkpoint["callbacks"]["CarbonLedger"]["ledger"]``).
"""

from __future__ import annotations

import json
import math
import pickle
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

POWER_SOURCES = ("nvml", "table", "configured")
# The power source of a ledger whose parts were measured differently (e.g. NVML on one node, table on another).
MIXED = "mixed"
# Per-rank figures: one dict per rank index with these keys.
RANK_KEYS = ("device_hours", "energy_kwh", "samples")
# CarbonLedger's Lightning state key (its class name): checkpoint["callbacks"][CALLBACK_STATE_KEY].
CALLBACK_STATE_KEY = "CarbonLedger"


@dataclass
class Ledger:
    """Device-hours, energy, CO2 and samples of one stage run (or the sum of several).

    ``device_hours`` sums every rank's time in the fit loop (one rank = one device); ``wall_hours``
    is the fit loop's own duration (the slowest rank), so device_hours ≈ world_size × wall_hours.
    ``co2_kg`` = ``energy_kwh`` × ``pue`` × ``carbon_intensity_kg_per_kwh`` per segment (a fit run
    between resumes); ``pue`` and the intensity are those of the latest segment.
    """

    device_hours: float = 0.0
    wall_hours: float = 0.0
    energy_kwh: float = 0.0
    co2_kg: float = 0.0
    samples: int = 0
    steps: int = 0
    pue: float = 1.0
    carbon_intensity_kg_per_kwh: float = 0.0
    device_name: str = ""
    power_source: str = ""
    world_size: int = 0
    # Fit runs that contributed: 1 for an uninterrupted run, +1 per resume / requeue.
    segments: int = 0
    per_rank: list[dict[str, float]] | None = field(default=None)

    @property
    def is_empty(self) -> bool:
        return self.segments == 0 and self.device_hours == 0 and self.samples == 0

    @property
    def samples_per_s(self) -> float | None:
        """Throughput of the whole job: samples per second of fit-loop wall time."""
        return self.samples / (self.wall_hours * 3600) if self.wall_hours > 0 else None

    @property
    def samples_per_device_s(self) -> float | None:
        """Throughput per device: samples per device-second (what a projection scales)."""
        return self.samples / (self.device_hours * 3600) if self.device_hours > 0 else None

    @property
    def average_power_kw(self) -> float | None:
        """Mean power per device over the run (measured with NVML, else the board power)."""
        return self.energy_kwh / self.device_hours if self.device_hours > 0 else None

    def add(self, other: Ledger) -> Ledger:
        """The sum of two ledgers (a later segment or stage in ``other``); neither is changed.

        Hours, energy, CO2, samples, steps and segments add. A device name or power source that
        differs between the two becomes ``"A + B"`` / ``"mixed"``; ``pue`` and the intensity are
        ``other``'s (the figures now in force); world_size is the larger one.
        """
        if not isinstance(other, Ledger):
            raise TypeError(f"Ledger.add needs a Ledger, got {type(other).__name__}")
        if other.is_empty:
            return Ledger.from_dict(self.to_dict())
        if self.is_empty:
            return Ledger.from_dict(other.to_dict())
        names = [n for n in dict.fromkeys(self.device_name.split(" + ") + other.device_name.split(" + ")) if n]
        per_rank = None
        if self.per_rank is not None or other.per_rank is not None:
            a, b = self.per_rank or [], other.per_rank or []
            per_rank = [
                {k: (a[i][k] if i < len(a) else 0) + (b[i][k] if i < len(b) else 0) for k in RANK_KEYS}
                for i in range(max(len(a), len(b)))
            ]
        return Ledger(
            device_hours=self.device_hours + other.device_hours,
            wall_hours=self.wall_hours + other.wall_hours,
            energy_kwh=self.energy_kwh + other.energy_kwh,
            co2_kg=self.co2_kg + other.co2_kg,
            samples=self.samples + other.samples,
            steps=self.steps + other.steps,
            pue=other.pue,
            carbon_intensity_kg_per_kwh=other.carbon_intensity_kg_per_kwh,
            device_name=" + ".join(names),
            power_source=self.power_source if self.power_source == other.power_source else MIXED,
            world_size=max(self.world_size, other.world_size),
            segments=self.segments + other.segments,
            per_rank=per_rank,
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (the provenance.json "accounting" object), derived throughputs included."""
        out = asdict(self)
        out["samples_per_s"] = self.samples_per_s
        out["samples_per_device_s"] = self.samples_per_device_s
        out["average_power_kw"] = self.average_power_kw
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "ledger") -> Ledger:
        """Inverse of :meth:`to_dict`; ``source`` names where ``data`` came from in errors."""
        if not isinstance(data, dict):
            raise TypeError(f"{source}: an accounting ledger must be a JSON object, got {type(data).__name__}")
        required = ("device_hours", "energy_kwh", "co2_kg", "samples")
        missing = [k for k in required if k not in data]
        if missing:
            raise ValueError(
                f"{source}: accounting ledger lacks {missing}; it was not written by train.accounting "
                "(re-export the stage, or regenerate the file)"
            )
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in data or data[f.name] is None and f.name != "per_rank":
                continue
            value = data[f.name]
            if f.name in ("samples", "steps", "world_size", "segments"):
                kwargs[f.name] = _number(value, f.name, source, int)
            elif f.name in ("device_name", "power_source"):
                kwargs[f.name] = str(value)
            elif f.name == "per_rank":
                kwargs[f.name] = _per_rank(value, source)
            else:
                kwargs[f.name] = _number(value, f.name, source, float)
        return cls(**kwargs)


def _number(value: Any, name: str, source: str, kind: type) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{source}: accounting field {name!r} must be a finite number ≥ 0, got {value!r}")
    return kind(value)


def _per_rank(value: Any, source: str) -> list[dict[str, float]] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(r, dict) for r in value):
        raise ValueError(f"{source}: accounting field 'per_rank' must be a list of objects, got {value!r}")
    return [{k: _number(r.get(k, 0), f"per_rank.{k}", source, float) for k in RANK_KEYS} for r in value]


def read_run_ledger(run_dir: str | Path) -> tuple[Ledger, Path]:
    """The ledger of a stage run directory and the file it came from.

    Prefers the finished run's ``export/provenance.json`` ("accounting"); a run still going (or
    killed) is read from its newest ``checkpoints/*.ckpt``.
    """
    run_dir = Path(run_dir)
    provenance = run_dir / "export" / "provenance.json"
    if provenance.is_file():
        data = json.loads(provenance.read_text())
        if "accounting" not in data:
            raise ValueError(
                f"{provenance} has no 'accounting' object: the run was trained without the CarbonLedger "
                "callback (conf/accounting/default.yaml); its cost is unknown"
            )
        return Ledger.from_dict(data["accounting"], source=str(provenance)), provenance
    checkpoints = sorted((run_dir / "checkpoints").glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    if not checkpoints:
        raise FileNotFoundError(
            f"{run_dir} is not a stage run directory: it has neither export/provenance.json nor "
            "checkpoints/*.ckpt. Point at a directory made by `wurst-train` (or a pipeline directory)"
        )
    return read_checkpoint_ledger(checkpoints[-1]), checkpoints[-1]


def read_checkpoint_ledger(checkpoint_path: str | Path) -> Ledger:
    """The ledger a Lightning checkpoint holds in the CarbonLedger callback's state."""
    import torch  # here, not at the top: the CLI's other commands start without torch

    try:
        checkpoint = torch.load(Path(checkpoint_path), map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"{checkpoint_path} holds objects that cannot be loaded safely (weights_only=True): {error}. "
            "Read the ledger from the run's export/provenance.json instead (finish or export the run)"
        ) from error
    state = checkpoint.get("callbacks", {}).get(CALLBACK_STATE_KEY)
    if state is None or "ledger" not in state:
        raise ValueError(
            f"{checkpoint_path} holds no CarbonLedger state: the run was trained without the callback "
            "(conf/accounting/default.yaml), so its cost was not recorded"
        )
    return Ledger.from_dict(state["ledger"], source=str(checkpoint_path))
