"""Which power figure a device gets: NVML counter, board-power table, or the configured wattage."""

import time

import pytest

from wurst.train.accounting.power import (
    BoardPowerMeter,
    board_power_watts,
    canonical_device_name,
    fallback_watts,
    open_energy_meter,
)


def _nvml_works() -> bool:
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetCount() > 0
    except Exception:  # noqa: BLE001 - any failure means: no NVML here
        return False


@pytest.mark.parametrize(
    ("reported", "canonical", "watts"),
    [
        ("NVIDIA A100-PCIE-40GB", "A100-PCIE-40GB", 250),
        ("NVIDIA A100-SXM4-80GB", "A100-SXM4-80GB", 400),
        ("NVIDIA H100 80GB HBM3", "H100-SXM5-80GB", 700),
        ("NVIDIA H100 PCIe", "H100-PCIE-80GB", 350),
        ("Tesla V100-SXM2-16GB", "V100-SXM2", 300),
        ("NVIDIA L40S", "L40S", 350),
        ("NVIDIA H200", "H200-SXM-141GB", 700),
    ],
)
def test_device_names_as_torch_reports_them_find_their_board_power(reported, canonical, watts):
    assert canonical_device_name(reported) == canonical
    assert board_power_watts(reported) == watts


def test_similar_names_do_not_collide():
    assert canonical_device_name("NVIDIA L40") == "L40"
    assert canonical_device_name("NVIDIA A10") == "A10"
    assert canonical_device_name("NVIDIA H200 NVL") == "H200-NVL"


def test_unknown_gpu_warns_and_uses_the_configured_wattage():
    with pytest.warns(RuntimeWarning, match="unknown accelerator 'NVIDIA Quantum X9000'.*fallback_watts"):
        meter = open_energy_meter("NVIDIA Quantum X9000", cuda_index=None, fallback=123.0)
    assert isinstance(meter, BoardPowerMeter)
    assert (meter.watts, meter.power_source, meter.device_name) == (123.0, "configured", "NVIDIA Quantum X9000")


def test_unknown_gpu_defaults_to_the_tables_fallback_wattage():
    with pytest.warns(RuntimeWarning):
        meter = open_energy_meter("Quantum X9000")
    assert meter.watts == fallback_watts()


def test_listed_gpu_without_nvml_uses_the_table():
    meter = open_energy_meter("NVIDIA A100-PCIE-40GB", cuda_index=0, use_nvml=False)
    assert (meter.watts, meter.power_source, meter.device_name) == (250.0, "table", "A100-PCIE-40GB")


@pytest.mark.skipif(_nvml_works(), reason="this machine has a working NVML")
def test_a_machine_without_an_nvml_driver_falls_back_to_the_table():
    meter = open_energy_meter("NVIDIA H100 PCIe", cuda_index=0, use_nvml=True)
    assert (meter.watts, meter.power_source) == (350.0, "table")


def test_cpu_runs_use_the_configured_wattage_without_warning(recwarn):
    meter = open_energy_meter("cpu", fallback=65.0)
    assert (meter.watts, meter.power_source) == (65.0, "configured")
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_device_watts_overrides_everything():
    meter = open_energy_meter("NVIDIA A100-PCIE-40GB", cuda_index=0, device_watts=275.0)
    assert (meter.watts, meter.power_source) == (275.0, "configured")


def test_board_power_meter_integrates_watts_over_time():
    before = time.monotonic()
    meter = BoardPowerMeter(100.0, "cpu", "configured")
    time.sleep(0.1)
    joules = meter.joules()
    assert 100.0 * 0.1 <= joules <= 100.0 * (time.monotonic() - before)
