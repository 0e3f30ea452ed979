"""Energy meters for one device: NVML's total-energy counter, or board power × time.

NVML (Volta and later) exposes a per-GPU counter of the energy the board drew since the driver
loaded (``nvmlDeviceGetTotalEnergyConsumption``, mJ): the difference over the fit loop is measured
energy, idle stalls included. Without it (no pynvml, no driver, an older GPU) the board power from
conf/accounting/tables/board_power.yaml × hours stands in (the paper's method), and a CPU run or an
accelerator missing from that table uses a configured wattage.
"""

from __future__ import annotations

import re
import time
import warnings
from dataclasses import dataclass, field

from wurst.train.accounting.tables import load_table

_VENDOR_WORDS = re.compile(r"^(NVIDIA|TESLA|GEFORCE|QUADRO)+")


def _normalise(name: str) -> str:
    # "NVIDIA A100-PCIE-40GB", "a100 pcie 40gb" and "Tesla A100_PCIe_40GB" all become "A100PCIE40GB".
    return _VENDOR_WORDS.sub("", re.sub(r"[^0-9A-Z]", "", name.upper()))


def board_power_table() -> dict[str, float]:
    """Canonical device name → board power in W."""
    return {key: float(entry["watts"]) for key, entry in load_table("board_power")["devices"].items()}


def fallback_watts() -> float:
    """The configured per-process wattage for CPU runs and unlisted accelerators (board_power.yaml)."""
    return float(load_table("board_power")["fallback_watts"])


def canonical_device_name(device_name: str) -> str | None:
    """The board-power table's key for ``device_name`` (any spelling it lists), or None if unlisted."""
    wanted = _normalise(device_name)
    if not wanted:
        return None
    for key, entry in load_table("board_power")["devices"].items():
        if wanted in {_normalise(key), *(_normalise(n) for n in entry["names"])}:
            return key
    return None


def board_power_watts(device_name: str) -> float | None:
    """Board power (W) of ``device_name`` from the table, or None if the table does not list it."""
    key = canonical_device_name(device_name)
    return None if key is None else board_power_table()[key]


@dataclass
class BoardPowerMeter:
    """Energy = a constant ``watts`` × the time since the meter started (table or configured power)."""

    watts: float
    device_name: str
    power_source: str
    _start: float = field(default_factory=time.monotonic, repr=False)

    def joules(self) -> float:
        return self.watts * (time.monotonic() - self._start)


class EnergyCounterUnavailable(RuntimeError):
    """NVML cannot report the device's total energy (no pynvml, no driver, or unsupported GPU)."""


class NvmlEnergyMeter:
    """Energy = NVML's total-energy counter now − at start, for one CUDA device."""

    power_source = "nvml"

    def __init__(self, cuda_index: int, device_name: str, stand_in_watts: float) -> None:
        try:
            import pynvml
        except ImportError as error:
            raise EnergyCounterUnavailable("pynvml is not installed (pip install nvidia-ml-py)") from error
        self._nvml = pynvml
        try:
            pynvml.nvmlInit()
            self._handle = self._handle_for(cuda_index)
            self._start_mj = pynvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)
        except pynvml.NVMLError as error:
            raise EnergyCounterUnavailable(f"NVML: {error}") from error
        self.device_name = device_name
        self._stand_in_watts = stand_in_watts
        self._last = (time.monotonic(), 0.0)  # the last good reading: (when, joules)

    def _handle_for(self, cuda_index: int):
        # CUDA and NVML may number GPUs differently (CUDA_VISIBLE_DEVICES, CUDA_DEVICE_ORDER): match by UUID.
        import torch

        uuid = str(getattr(torch.cuda.get_device_properties(cuda_index), "uuid", ""))
        if uuid:
            try:
                return self._nvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
            except self._nvml.NVMLError:
                pass
        return self._nvml.nvmlDeviceGetHandleByIndex(cuda_index)

    def joules(self) -> float:
        now = time.monotonic()
        try:
            joules = (self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle) - self._start_mj) / 1000.0
        except self._nvml.NVMLError as error:
            # A counter that stops answering mid-run must not stop training: extrapolate from the last reading.
            warnings.warn(f"NVML energy read failed on {self.device_name} ({error}); counting "
                          f"{self._stand_in_watts:g} W since the last reading", RuntimeWarning, stacklevel=2)
            then, joules = self._last
            return joules + self._stand_in_watts * (now - then)
        self._last = (now, joules)
        return joules


def open_energy_meter(
    device_name: str,
    cuda_index: int | None = None,
    device_watts: float | None = None,
    fallback: float | None = None,
    use_nvml: bool = True,
) -> BoardPowerMeter | NvmlEnergyMeter:
    """The best energy meter for one device, started now.

    ``device_watts`` forces that figure ("configured"). Otherwise a CUDA device (``cuda_index``) is
    metered by NVML when it can be, else by its board power from the table ("table"); a device the
    table does not list — or a CPU run (``device_name="cpu"``) — uses ``fallback`` W (default: the
    table's fallback_watts) as "configured", with a warning for an unlisted accelerator.
    """
    if device_watts is not None:
        if device_watts <= 0:
            raise ValueError(f"device_watts must be > 0 W, got {device_watts!r}; leave it null to measure")
        return BoardPowerMeter(float(device_watts), device_name, "configured")
    fallback = fallback_watts() if fallback is None else float(fallback)
    if fallback <= 0:
        raise ValueError(f"fallback_watts must be > 0 W, got {fallback!r}")
    if device_name == "cpu":
        return BoardPowerMeter(fallback, "cpu", "configured")
    canonical = canonical_device_name(device_name)
    if cuda_index is not None and use_nvml:
        try:
            stand_in = board_power_table()[canonical] if canonical else fallback
            return NvmlEnergyMeter(cuda_index, canonical or device_name, stand_in)
        except EnergyCounterUnavailable as why:
            reason = str(why)
    else:
        reason = "NVML not used"
    if canonical is not None:
        return BoardPowerMeter(board_power_table()[canonical], canonical, "table")
    warnings.warn(
        f"unknown accelerator {device_name!r}: no energy counter ({reason}) and no entry in the board-power "
        f"table conf/accounting/tables/board_power.yaml; counting {fallback:g} W per device (fallback_watts). "
        "Add the device to that table or set accounting.device_watts to its board power.",
        RuntimeWarning,
        stacklevel=2,
    )
    return BoardPowerMeter(fallback, device_name, "configured")
