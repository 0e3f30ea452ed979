"""Projection of a measured run to a recipe's phases (hand-checked numbers)."""

import json

import pytest

from wurst.train.accounting.cli import main
from wurst.train.accounting.ledger import Ledger
from wurst.train.accounting.projection import DEFAULT_RECIPE, project, read_recipe, render

# Measured: 90,000 samples in 0.5 device-hours (50 samples per device-second) at 0.4 kW per device.
RUN = Ledger(device_hours=0.5, wall_hours=0.25, energy_kwh=0.2, co2_kg=0.074, samples=90_000, steps=180, pue=1.0,
             carbon_intensity_kg_per_kwh=0.37, device_name="H100-SXM5-80GB", power_source="nvml", world_size=2,
             segments=1)


@pytest.fixture
def recipe(tmp_path):
    """A recipe dir shaped like conf/experiment/paper_v2: two phases with a batch, one without."""
    phases = {
        "stage_b_p1": "trainer:\n  max_steps: 360\ndata:\n  global_batch_size: 500\n",
        "stage_b_p2": "trainer:\n  max_steps: 720\ndata:\n  global_batch_size: 1000\n",
        "stage_c_p3": "trainer:\n  max_steps: 4000\ndata:\n  global_batch_size: null\n",
    }
    for name, text in phases.items():
        (tmp_path / f"{name}.yaml").write_text("# @package _global_\n" + text)
    return tmp_path


def test_recipe_phases_are_steps_times_global_batch(recipe):
    phases = {p.name: p for p in read_recipe(recipe)}
    assert phases["stage_b_p1"].samples == 180_000
    assert phases["stage_b_p2"].samples == 720_000
    assert phases["stage_c_p3"].samples is None


def test_projection_scales_measured_throughput_and_power(recipe):
    costs = {c.phase: c for c in project(RUN, read_recipe(recipe)).phases}
    # 180,000 samples / 50 per device-second = 3,600 s = 1 h; × 0.4 kW = 0.4 kWh; × 1.0 × 0.37 = 0.148 kg.
    assert costs["stage_b_p1"].device_hours == pytest.approx(1.0)
    assert costs["stage_b_p1"].energy_kwh == pytest.approx(0.4)
    assert costs["stage_b_p1"].co2_kg == pytest.approx(0.148)
    # 720,000 samples → 4 h → 1.6 kWh → 0.592 kg.
    assert (costs["stage_b_p2"].device_hours, costs["stage_b_p2"].energy_kwh) == pytest.approx((4.0, 1.6))
    assert costs["stage_b_p2"].co2_kg == pytest.approx(0.592)


def test_phases_without_a_batch_are_unknown_and_left_out_of_the_total(recipe):
    projection = project(RUN, read_recipe(recipe))
    assert projection.unknown == ["stage_c_p3"]
    assert projection.total.samples == 900_000
    assert (projection.total.device_hours, projection.total.energy_kwh) == pytest.approx((5.0, 2.0))
    assert projection.total.co2_kg == pytest.approx(0.74)
    assert "excludes 1 unknown" in projection.total.note


def test_projection_takes_another_grid_and_pue(recipe):
    projection = project(RUN, read_recipe(recipe, phases="stage_b_p1"), pue=1.5, carbon_intensity_kg_per_kwh=0.1)
    assert projection.total.co2_kg == pytest.approx(0.4 * 1.5 * 0.1)


def test_project_command_prints_json_with_rounded_figures(recipe, tmp_path_factory, write_stage_run, capsys):
    run_dir = write_stage_run(tmp_path_factory.mktemp("runs") / "stage_b", RUN)
    assert main(["project", str(run_dir), "--recipe", str(recipe), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["samples_per_device_s"] == pytest.approx(50.0)
    assert out["total"] == {"phase": "total", "samples": 900_000, "device_hours": 5.0, "energy_kwh": 2.0,
                            "co2_kg": 0.74, "note": "excludes 1 unknown phase(s)"}
    assert out["unknown_phases"] == ["stage_c_p3"]


def test_project_table_marks_unknown_phases(recipe):
    text = render(project(RUN, read_recipe(recipe)))
    assert "| stage_c_p3 | unknown | unknown | unknown | unknown |" in text
    assert "| total | 900,000 | 5.00 | 2.00 | 0.74 |" in text


def test_a_value_interpolated_from_the_rest_of_the_config_counts_as_unknown(tmp_path):
    (tmp_path / "stage_a.yaml").write_text("trainer:\n  max_steps: 10\ndata:\n  global_batch_size: ${batch}\n")
    [phase] = read_recipe(tmp_path)
    assert phase.samples is None and "data.global_batch_size" in phase.note


def test_a_non_integer_batch_is_an_error_naming_the_file(tmp_path):
    (tmp_path / "stage_a.yaml").write_text("trainer:\n  max_steps: 10\ndata:\n  global_batch_size: 2.5\n")
    with pytest.raises(ValueError, match=r"stage_a.yaml: data.global_batch_size"):
        read_recipe(tmp_path)


def test_a_missing_recipe_dir_is_an_error_naming_the_expected_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="trainer.max_steps and data.global_batch_size"):
        read_recipe(tmp_path / "nowhere")


def test_a_run_that_never_trained_cannot_be_projected(recipe):
    with pytest.raises(ValueError, match="samples > 0"):
        project(Ledger(), read_recipe(recipe))


@pytest.fixture
def conf_tree(tmp_path):
    """A Hydra conf tree like the repository's: train.yaml with group defaults, experiment/mini/ phases."""
    conf = tmp_path / "conf"
    for group in ("trainer", "data", "experiment/mini"):
        (conf / group).mkdir(parents=True)
    (conf / "train.yaml").write_text("defaults:\n  - trainer: base\n  - data: base\n  - experiment: null\n"
                                     "  - _self_\nseed: 0\n")
    (conf / "trainer" / "base.yaml").write_text("max_steps: 1\n")
    (conf / "data" / "base.yaml").write_text("global_batch_size: 8\n")
    phases = {
        "p1": "trainer:\n  max_steps: 100\ndata:\n  global_batch_size: 32\n",
        "p2": "defaults:\n  - mini/p1\n  - _self_\ntrainer:\n  max_steps: 50\n",  # inherits p1's batch
        "p3": "trainer:\n  max_steps: 10\n",  # batch from data/base.yaml
        "p4": "trainer:\n  max_steps: 10\ndata:\n  global_batch_size: null\n",
    }
    for name, text in phases.items():
        (conf / "experiment" / "mini" / f"{name}.yaml").write_text("# @package _global_\n" + text)
    return conf / "experiment" / "mini"


def test_phases_in_a_conf_tree_are_read_as_hydra_composes_them(conf_tree):
    samples = {p.name: p.samples for p in read_recipe(conf_tree)}
    assert samples == {"p1": 100 * 32, "p2": 50 * 32, "p3": 10 * 8, "p4": None}


@pytest.mark.skipif(not DEFAULT_RECIPE.is_dir(), reason="conf/experiment/paper_v2 not written yet")
def test_the_paper_v2_recipe_has_the_papers_samples_per_phase():
    # REFERENCE.md "Training recipe": iterations × batch for the phases the paper gives both for.
    samples = {p.name: p.samples for p in read_recipe(DEFAULT_RECIPE)}
    assert samples["stage_b_512"] == 457_000 * 512
    assert samples["stage_b_1024"] == 300_000 * 128
    assert samples["stage_c_p1"] == 500_000 * 1536
    assert samples["stage_c_p2"] == 364_000 * 1536
    assert samples["stage_c_p4"] == 50_000 * 384
