"""The pipeline ledger: stages summed in the shape of the paper's Table 2, paper rows beside them."""

import json

import pytest

from wurst.train.accounting.cli import main
from wurst.train.accounting.ledger import Ledger
from wurst.train.accounting.pipeline import count_params, pipeline_table, read_pipeline, table2

STAGE_A = Ledger(device_hours=1.5, wall_hours=0.75, energy_kwh=0.375, co2_kg=0.13875, samples=10_000, steps=100,
                 pue=1.0, carbon_intensity_kg_per_kwh=0.37, device_name="A100-PCIE-40GB", power_source="table",
                 world_size=2, segments=1)
STAGE_B = Ledger(device_hours=4.0, wall_hours=0.5, energy_kwh=1.0, co2_kg=0.37, samples=2_000_000, steps=2_000,
                 pue=1.0, carbon_intensity_kg_per_kwh=0.37, device_name="A100-PCIE-40GB", power_source="table",
                 world_size=8, segments=2)
STAGE_C = Ledger(device_hours=24602.0, wall_hours=3075.25, energy_kwh=6150.5, co2_kg=2275.685, samples=1_420_000_000,
                 steps=918_000, pue=1.0, carbon_intensity_kg_per_kwh=0.37, device_name="A100-PCIE-40GB",
                 power_source="table", world_size=8, segments=30)


@pytest.fixture
def pipeline_dir(tmp_path, write_stage_run):
    """Three stage runs: A counts its params from model.safetensors, B and C state them in provenance."""
    write_stage_run(tmp_path / "stage_a", STAGE_A, weights={"encoder.weight": [64, 3, 4, 4], "codebook": [8192, 4]})
    write_stage_run(tmp_path / "stage_b", STAGE_B, params=1_055_400_000)
    write_stage_run(tmp_path / "stage_c", STAGE_C, params=993_600_000)
    (tmp_path / "pipeline.json").write_text("{}")
    return tmp_path


def test_params_are_counted_from_the_safetensors_header(tmp_path, write_stage_run):
    write_stage_run(tmp_path / "run", STAGE_A, weights={"w": [3, 5], "b": [7]})
    assert count_params(tmp_path / "run" / "export" / "model.safetensors") == 22


def test_each_stage_has_its_ledger_and_params(pipeline_dir):
    pipeline = read_pipeline(pipeline_dir)
    assert list(pipeline.stages) == ["a", "b", "c"]
    assert pipeline.stages["a"].params == 64 * 3 * 4 * 4 + 8192 * 4
    assert pipeline.stages["c"].params == 993_600_000
    assert pipeline.stages["b"].ledger == STAGE_B


def test_the_total_sums_the_stages(pipeline_dir):
    total = read_pipeline(pipeline_dir).total
    assert total.device_hours == 1.5 + 4.0 + 24602.0
    assert total.samples == 10_000 + 2_000_000 + 1_420_000_000
    assert total.co2_kg == pytest.approx(0.13875 + 0.37 + 2275.685)
    assert total.segments == 33


def test_table_rows_are_the_stages_the_total_then_the_paper(pipeline_dir):
    rows = table2(read_pipeline(pipeline_dir)).splitlines()
    assert rows[0] == "| model | params | GPU hours | train samples | CO2 |"
    assert rows[2].startswith("| Stage A (this pipeline) | 35.8 k | 1.5 A100-PCIE-40GB | 10 k | 0.14 kg |")
    assert rows[4] == "| Stage C (this pipeline) | 0.994 B | 24,602 A100-PCIE-40GB | 1.42 B | 2,275.68 kg |"
    assert rows[5].startswith("| total (this pipeline) |")
    assert rows[6] == "| Würstchen Stage C (paper) | 0.99 B | 24,602 A100 | 1.42 B | 2,275.68 kg |"
    assert rows[7] == "| Würstchen Stage B (paper) | ~1 B | ~11,000 A100 | ~318 M | — |"
    assert rows[8] == "| SD 1.4 (paper) | 0.8 B | 150,000 | 4.8 B | 11,250.00 kg |"
    assert rows[9] == "| SD 2.1 (paper) | 0.8 B | 200,000 | 3.9 B | 15,000.00 kg |"


def test_pipeline_table_reads_the_directory(pipeline_dir):
    assert pipeline_table(pipeline_dir) == table2(read_pipeline(pipeline_dir))


def test_report_of_a_pipeline_prints_the_table(pipeline_dir, capsys):
    assert main(["report", str(pipeline_dir)]) == 0
    out = capsys.readouterr().out
    assert "| total (this pipeline) |" in out and "Würstchen Stage C (paper)" in out


def test_report_json_carries_each_stage_and_the_sum(pipeline_dir, capsys):
    assert main(["report", str(pipeline_dir), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["stages"]) == {"a", "b", "c"}
    assert out["total"]["device_hours"] == 24607.5


def test_a_pipeline_with_only_some_stages_reports_those(tmp_path, write_stage_run):
    write_stage_run(tmp_path / "stage_a", STAGE_A, params=18_400_000)
    pipeline = read_pipeline(tmp_path)
    assert list(pipeline.stages) == ["a"] and pipeline.total == STAGE_A


def test_a_stage_run_exported_without_accounting_is_an_error_naming_the_file(tmp_path):
    export = tmp_path / "stage_a" / "export"
    export.mkdir(parents=True)
    (export / "provenance.json").write_text(json.dumps({"git_rev": "x"}))
    with pytest.raises(ValueError, match=r"provenance.json has no 'accounting'"):
        read_pipeline(tmp_path)


def test_report_of_a_directory_that_is_no_run_names_what_is_missing(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "export/provenance.json" in capsys.readouterr().err
