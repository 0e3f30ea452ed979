"""The Ledger: sums of segments and stages, and its JSON form."""

import pytest

from wurst.train.accounting.ledger import Ledger


def _ledger(**overrides) -> Ledger:
    figures = {
        "device_hours": 2.0, "wall_hours": 1.0, "energy_kwh": 0.5, "co2_kg": 0.185, "samples": 100, "steps": 10,
        "pue": 1.0, "carbon_intensity_kg_per_kwh": 0.37, "device_name": "A100-PCIE-40GB", "power_source": "table",
        "world_size": 2, "segments": 1, "per_rank": [{"device_hours": 1.0, "energy_kwh": 0.25, "samples": 50.0}] * 2,
    }
    return Ledger(**{**figures, **overrides})


def test_dict_round_trip_keeps_every_field():
    ledger = _ledger()
    assert Ledger.from_dict(ledger.to_dict()) == ledger


def test_to_dict_adds_throughputs():
    out = _ledger().to_dict()
    assert out["samples_per_s"] == pytest.approx(100 / 3600)
    assert out["samples_per_device_s"] == pytest.approx(100 / 7200)
    assert out["average_power_kw"] == pytest.approx(0.25)


def test_add_sums_hours_energy_co2_samples_steps_and_segments():
    total = _ledger().add(_ledger(pue=1.2))
    assert (total.device_hours, total.wall_hours, total.energy_kwh) == (4.0, 2.0, 1.0)
    assert (total.co2_kg, total.samples, total.steps, total.segments) == (0.37, 200, 20, 2)
    assert total.pue == 1.2
    assert total.per_rank == [{"device_hours": 2.0, "energy_kwh": 0.5, "samples": 100.0}] * 2


def test_add_marks_different_devices_and_power_sources():
    total = _ledger().add(_ledger(device_name="H100-SXM5-80GB", power_source="nvml"))
    assert total.device_name == "A100-PCIE-40GB + H100-SXM5-80GB"
    assert total.power_source == "mixed"


def test_an_empty_ledger_adds_nothing():
    assert Ledger().add(_ledger()) == _ledger()
    assert _ledger().add(Ledger()) == _ledger()


def test_add_does_not_change_its_operands():
    a, b = _ledger(), _ledger()
    a.add(b)
    assert a == _ledger() and b == _ledger()


def test_from_dict_names_missing_fields_and_source():
    with pytest.raises(ValueError, match=r"run/provenance.json.*'co2_kg'"):
        Ledger.from_dict({"device_hours": 1.0, "energy_kwh": 1.0, "samples": 1}, source="run/provenance.json")


def test_from_dict_refuses_negative_figures():
    with pytest.raises(ValueError, match="device_hours"):
        Ledger.from_dict({**_ledger().to_dict(), "device_hours": -1.0})
