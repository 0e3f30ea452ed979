"""Energy and CO2 arithmetic, and `wurst-carbon estimate` (REFERENCE.md "Compute and carbon")."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from wurst.train.accounting.carbon import co2_kg, energy_kwh, resolve_carbon_intensity, round_half_even
from wurst.train.accounting.cli import main


def test_estimate_prints_the_papers_stage_c_co2(capsys):
    assert main(["estimate", "--gpu", "A100-PCIE-40GB", "--gpu-hours", "24602", "--carbon-intensity", "0.37"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["co2_kg"] == 2275.68
    assert out["energy_kwh"] == 6150.5
    assert out["board_power_w"] == 250


def test_estimate_console_script_prints_2275_68():
    script = Path(sys.executable).with_name("wurst-carbon")
    done = subprocess.run(
        [str(script), "estimate", "--gpu", "A100-PCIE-40GB", "--gpu-hours", "24602", "--carbon-intensity", "0.37"],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert done.returncode == 0, done.stderr
    assert '"co2_kg": 2275.68' in done.stdout


def test_co2_is_energy_times_pue_times_intensity():
    assert co2_kg(100.0, 1.5, 0.4) == pytest.approx(60.0)
    assert energy_kwh(3.0, 400) == 1.2


def test_rounding_is_half_to_even_on_the_decimal_figure():
    assert round_half_even(2275.685) == 2275.68
    assert round_half_even(2275.695) == 2275.70
    assert round_half_even(0.125) == 0.12


def test_estimate_uses_a_region_preset_when_given(capsys):
    main(["estimate", "--gpu", "H100 PCIe", "--gpu-hours", "10", "--region", "world-average"])
    out = json.loads(capsys.readouterr().out)
    assert out["carbon_intensity_kg_per_kwh"] == 0.475
    assert out["energy_kwh"] == 3.5  # 10 h × 350 W
    assert out["co2_kg"] == round_half_even(3.5 * 0.475)


def test_estimate_applies_the_pue(capsys):
    main(["estimate", "--gpu", "A100-PCIE-40GB", "--gpu-hours", "24602", "--carbon-intensity", "0.37",
          "--pue", "1.1"])
    assert json.loads(capsys.readouterr().out)["co2_kg"] == round_half_even(6150.5 * 1.1 * 0.37)


def test_estimate_of_an_unknown_gpu_without_watts_is_an_error_naming_the_fix(capsys):
    assert main(["estimate", "--gpu", "Quantum X9000", "--gpu-hours", "1"]) == 2
    err = capsys.readouterr().err
    assert "Quantum X9000" in err and "--watts" in err


def test_estimate_of_an_unknown_gpu_takes_watts(capsys):
    assert main(["estimate", "--gpu", "Quantum X9000", "--gpu-hours", "2", "--watts", "500"]) == 0
    assert json.loads(capsys.readouterr().out)["energy_kwh"] == 1.0


def test_intensity_and_region_together_are_refused():
    with pytest.raises(ValueError, match="not both"):
        resolve_carbon_intensity(0.3, "aws-us-east-1")


def test_unknown_region_names_the_known_presets():
    with pytest.raises(ValueError, match="aws-us-east-1"):
        resolve_carbon_intensity(region="mars-north-1")


def test_pue_below_one_is_refused():
    with pytest.raises(ValueError, match="pue"):
        co2_kg(1.0, 0.9, 0.37)
