"""Projection: what the full paper_v2 recipe would cost on the hardware a measured run used.

Each phase's samples are ``trainer.max_steps × data.global_batch_size`` of
``conf/experiment/paper_v2/<stage>_<phase>.yaml`` as Hydra composes it with ``conf/train.yaml`` (so a
phase inherits what its defaults list brings, as in training; a recipe directory outside a conf tree
is read file by file); the run's measured throughput (samples per
device-second) turns them into device-hours, its measured mean power per device into energy, and
PUE × grid intensity into CO2. A phase whose steps or batch the paper leaves open (null) is reported
as unknown and left out of the total. The run should use the phase's model size and resolution: a
throughput measured at one resolution says little about another.
"""

from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from wurst.train.accounting.carbon import co2_kg, round_half_even
from wurst.train.accounting.ledger import Ledger

DEFAULT_RECIPE = Path(__file__).resolve().parents[2] / "conf" / "experiment" / "paper_v2"


@dataclass
class Phase:
    """One recipe phase: its name (the yaml file's stem), optimizer steps and global batch size."""

    name: str
    steps: int | None
    global_batch_size: int | None
    note: str = ""

    @property
    def samples(self) -> int | None:
        if self.steps is None or self.global_batch_size is None:
            return None
        return self.steps * self.global_batch_size


def _positive_int(config: Any, key: str, path: Path) -> tuple[int | None, str]:
    try:
        value = OmegaConf.select(config, key, default=None, throw_on_missing=False)
    except OmegaConfBaseException as error:  # an interpolation into the rest of the Hydra tree cannot resolve here
        return None, f"{key} unreadable here ({type(error).__name__})"
    if value is None or value == -1:  # -1: Lightning's "no step limit"
        return None, f"{key} not given"
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{path}: {key} must be a positive integer or null, got {value!r}")
    return value, ""


def _experiment_group(recipe_dir: Path) -> tuple[Path, str] | None:
    """(conf root holding train.yaml, the recipe's path inside its experiment/ group), if it has one."""
    recipe_dir = recipe_dir.resolve()
    for parent in [recipe_dir, *recipe_dir.parents]:
        if parent.name == "experiment" and (parent.parent / "train.yaml").is_file():
            inside = recipe_dir.relative_to(parent).as_posix()
            return parent.parent, "" if inside == "." else inside + "/"
    return None


def read_recipe(recipe_dir: str | Path = DEFAULT_RECIPE, phases: str = "*") -> list[Phase]:
    """The phases of a recipe directory (``*.yaml`` whose stem matches the glob ``phases``), by name."""
    recipe_dir = Path(recipe_dir)
    files = sorted(p for p in recipe_dir.glob("*.yaml") if fnmatch.fnmatch(p.stem, phases))
    if not files:
        raise FileNotFoundError(
            f"no recipe phases matching {phases!r} in {recipe_dir}: expected "
            "<stage>_<phase>.yaml files with trainer.max_steps and data.global_batch_size "
            "(conf/experiment/paper_v2/); pass --recipe DIR or fix --phases"
        )
    group = _experiment_group(recipe_dir)
    configs = _composed(files, *group) if group else [OmegaConf.load(path) for path in files]
    out = []
    for path, config in zip(files, configs):
        steps, steps_note = _positive_int(config, "trainer.max_steps", path)
        batch, batch_note = _positive_int(config, "data.global_batch_size", path)
        out.append(Phase(path.stem, steps, batch, "; ".join(n for n in (steps_note, batch_note) if n)))
    return out


def _composed(files: list[Path], conf_root: Path, prefix: str) -> list[Any]:
    """Each phase as training sees it: ``train.yaml`` composed with ``experiment=<prefix><stem>``."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    out = []
    with initialize_config_dir(version_base="1.3", config_dir=str(conf_root)):
        for path in files:
            try:
                out.append(compose("train", overrides=[f"experiment={prefix}{path.stem}"]))
            except (HydraException, OmegaConfBaseException) as error:
                raise ValueError(
                    f"{path}: Hydra cannot compose experiment={prefix}{path.stem} with {conf_root}/train.yaml "
                    f"({error}); `wurst-train experiment={prefix}{path.stem}` would fail the same way"
                ) from error
    return out


@dataclass
class PhaseCost:
    phase: str
    samples: int | None
    device_hours: float | None
    energy_kwh: float | None
    co2_kg: float | None
    note: str = ""


@dataclass
class Projection:
    """Per-phase projected cost and the total over phases with known samples."""

    samples_per_device_s: float
    average_power_kw: float
    device_name: str
    pue: float
    carbon_intensity_kg_per_kwh: float
    phases: list[PhaseCost]
    total: PhaseCost

    @property
    def unknown(self) -> list[str]:
        return [p.phase for p in self.phases if p.samples is None]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able; hours, kWh and kg rounded to 2 decimals."""

        def rounded(cost: PhaseCost) -> dict[str, Any]:
            out = asdict(cost)
            for key in ("device_hours", "energy_kwh", "co2_kg"):
                if out[key] is not None:
                    out[key] = round_half_even(out[key])
            return out

        return {
            "samples_per_device_s": self.samples_per_device_s,
            "average_power_kw": self.average_power_kw,
            "device_name": self.device_name,
            "pue": self.pue,
            "carbon_intensity_kg_per_kwh": self.carbon_intensity_kg_per_kwh,
            "phases": [rounded(p) for p in self.phases],
            "total": rounded(self.total),
            "unknown_phases": self.unknown,
        }


def project(
    run: Ledger,
    phases: list[Phase],
    pue: float | None = None,
    carbon_intensity_kg_per_kwh: float | None = None,
) -> Projection:
    """Scales ``run``'s measured throughput and power to ``phases`` (PUE / intensity: the run's unless given)."""
    if run.samples <= 0 or run.device_hours <= 0:
        raise ValueError(
            f"the measured run has {run.samples} samples over {run.device_hours} device-hours; a projection "
            "needs a run that trained (samples > 0 and device-hours > 0)"
        )
    pue = run.pue if pue is None else pue
    intensity = run.carbon_intensity_kg_per_kwh if carbon_intensity_kg_per_kwh is None else carbon_intensity_kg_per_kwh
    hours_per_sample = run.device_hours / run.samples
    kw = run.energy_kwh / run.device_hours
    costs = []
    for phase in phases:
        if phase.samples is None:
            costs.append(PhaseCost(phase.name, None, None, None, None, phase.note or "unknown"))
            continue
        hours = phase.samples * hours_per_sample
        energy = hours * kw
        costs.append(PhaseCost(phase.name, phase.samples, hours, energy, co2_kg(energy, pue, intensity)))
    known = [c for c in costs if c.samples is not None]
    unknown = len(costs) - len(known)
    total = PhaseCost(
        "total",
        sum(c.samples for c in known),
        sum(c.device_hours for c in known),
        sum(c.energy_kwh for c in known),
        sum(c.co2_kg for c in known),
        f"excludes {unknown} unknown phase(s)" if unknown else "",
    )
    return Projection(
        samples_per_device_s=run.samples / (run.device_hours * 3600),
        average_power_kw=kw,
        device_name=run.device_name,
        pue=pue,
        carbon_intensity_kg_per_kwh=intensity,
        phases=costs,
        total=total,
    )


def render(projection: Projection) -> str:
    """Markdown table of the projection, headed by the measured throughput and power it scales."""
    p = projection
    lines = [
        (
            f"measured on {p.device_name or 'unknown device'}: {p.samples_per_device_s:.4g} samples/s per device, "
            f"{p.average_power_kw * 1000:.4g} W per device; CO2 at PUE {p.pue:g} × "
            f"{p.carbon_intensity_kg_per_kwh:g} kg/kWh"
        ),
        "",
        "| phase | samples | device-hours | energy (kWh) | CO2 (kg) | note |",
        "|---|---|---|---|---|---|",
    ]
    for cost in [*p.phases, p.total]:
        cells = [
            cost.phase,
            f"{cost.samples:,}" if cost.samples is not None else "unknown",
            *(f"{round_half_even(v):,.2f}" if v is not None else "unknown"
              for v in (cost.device_hours, cost.energy_kwh, cost.co2_kg)),
            cost.note,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
