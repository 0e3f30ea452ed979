"""Energy and CO2 arithmetic: energy = device-hours × board power; CO2 = energy × PUE × grid intensity.

This is the ML CO2 Impact method the paper's Table 2 uses (REFERENCE.md "Compute and carbon"):
24,602 A100 PCIe 40 GB hours × 0.25 kW × 0.37 kg/kWh = 2,275.685 kg, printed as 2,275.68. The products
are formed in decimal arithmetic from the figures as written, so that result does not hinge on binary
float noise, and rounded half-to-even (the IEEE 754 default) — which is what turns ...685 into ...68.
"""

from __future__ import annotations

import math
from decimal import ROUND_HALF_EVEN, Decimal

from wurst.train.accounting.tables import load_table


def _decimal(value: float, name: str) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number ≥ 0, got {value!r}")
    # repr() is the shortest decimal that round-trips, i.e. the figure as the user wrote it.
    return Decimal(repr(value))


def energy_kwh(device_hours: float, watts: float) -> float:
    """Energy of ``device_hours`` at a constant board power of ``watts``, in kWh."""
    return float(_decimal(device_hours, "device_hours") * _decimal(watts, "watts") / 1000)


def co2_kg(energy_kwh: float, pue: float, carbon_intensity_kg_per_kwh: float) -> float:
    """kg CO2eq of ``energy_kwh`` drawn by the devices, with the site's PUE and the grid's intensity."""
    if isinstance(pue, (int, float)) and not isinstance(pue, bool) and pue < 1:
        raise ValueError(f"pue must be ≥ 1 (total facility energy / IT energy), got {pue!r}")
    product = (
        _decimal(energy_kwh, "energy_kwh")
        * _decimal(pue, "pue")
        * _decimal(carbon_intensity_kg_per_kwh, "carbon_intensity_kg_per_kwh")
    )
    return float(product)


def round_half_even(value: float, places: int = 2) -> float:
    """``value`` rounded to ``places`` decimals, half-to-even on its shortest decimal form (2275.685 → 2275.68)."""
    quantum = Decimal(1).scaleb(-places)
    return float(Decimal(repr(float(value))).quantize(quantum, rounding=ROUND_HALF_EVEN))


def region_presets() -> dict[str, float]:
    """Grid intensity presets, kg CO2eq/kWh, from conf/accounting/tables/carbon.yaml."""
    return dict(load_table("carbon")["regions"])


def default_pue() -> float:
    return float(load_table("carbon")["default_pue"])


def resolve_carbon_intensity(carbon_intensity_kg_per_kwh: float | None = None, region: str | None = None) -> float:
    """The grid intensity to use: an explicit figure, or a region preset, or the default region's preset."""
    if carbon_intensity_kg_per_kwh is not None and region is not None:
        raise ValueError(
            f"give either carbon_intensity_kg_per_kwh ({carbon_intensity_kg_per_kwh}) or region ({region!r}), "
            "not both: the region is only a preset for the intensity"
        )
    if carbon_intensity_kg_per_kwh is not None:
        return float(_decimal(carbon_intensity_kg_per_kwh, "carbon_intensity_kg_per_kwh"))
    presets = region_presets()
    region = region if region is not None else load_table("carbon")["default_region"]
    if region not in presets:
        raise ValueError(
            f"region {region!r} has no carbon-intensity preset; known: {sorted(presets)}. Pass "
            "carbon_intensity_kg_per_kwh instead, or add the region to conf/accounting/tables/carbon.yaml"
        )
    return float(presets[region])
