"""The training-step benchmark, run on CPU with the tiny configs (benchmarks/bench_train_step.py)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # two tiny benchmark runs, ~10-20 s each on a shared CPU


def table_rows(table: str) -> dict[str, list[str]]:
    """The markdown table's body rows, by their first cell (the run's name)."""
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and not line.startswith("| run ") and not set(cells[0]) <= set("-"):
            rows[cells[0]] = cells
    return rows


def number(cell: str) -> float:
    """The leading number of a table cell ('93.4 (CPU 60.1)', '1.85×', '2,193')."""
    match = re.match(r"-?[\d,]*\.?\d+(e[-+]?\d+)?", cell)
    assert match, f"table cell {cell!r} does not start with a number"
    return float(match.group(0).replace(",", ""))


def test_stage_c_measures_ours_from_images_and_cache_and_the_reference(stage_c_result):
    runs = {run["run"]: run for run in stage_c_result["runs"]}
    assert set(runs) == {"ours (images)", "ours (cache)", "reference (images)"}
    assert runs["ours (images)"]["network"] == "StageC"
    assert runs["reference (images)"]["network"] == "WuerstchenPrior"


def test_stage_b_measures_ours_and_the_reference(stage_b_result):
    runs = {run["run"]: run for run in stage_b_result["runs"]}
    assert set(runs) == {"ours (images)", "reference (images)"}
    assert runs["ours (images)"]["network"] == "StageB"
    assert runs["reference (images)"]["network"] == "WuerstchenDiffNeXt"


@pytest.mark.parametrize("result_fixture", ["stage_c_result", "stage_b_result"])
def test_every_figure_is_finite_and_positive(result_fixture, request):
    result = request.getfixturevalue(result_fixture)
    for run in result["runs"]:
        assert len(run["step_seconds"]) == result["setup"]["steps"]
        for key in ("step_s_median", "samples_per_s", "peak_memory_bytes", "flops_per_step", "speedup_vs_reference"):
            assert math.isfinite(run[key]) and run[key] > 0, f"{run['run']}: {key} = {run[key]}"
        assert run["samples_per_s"] == pytest.approx(run["batch"] / run["step_s_median"])
        assert run["mfu"] is None  # CPU: no peak FLOP/s to divide by


@pytest.mark.parametrize("result_fixture", ["stage_c_result", "stage_b_result"])
def test_prints_a_markdown_table_of_every_run_with_finite_numbers(result_fixture, request):
    result = request.getfixturevalue(result_fixture)
    assert result["table"] in result["stdout"]
    rows = table_rows(result["table"])
    assert set(rows) == {run["run"] for run in result["runs"]}
    for name, cells in rows.items():
        # step ms, samples/s, vs reference, peak GiB, TFLOP/step; MFU is n/a on CPU
        for cell in (cells[2], cells[3], cells[4], cells[5], cells[6]):
            assert math.isfinite(number(cell)) and number(cell) > 0, f"{name}: {cell!r}"
        assert cells[7] == "n/a"
        assert cells[8].isdigit()


def test_the_run_is_well_under_a_minute(stage_c_result, stage_b_result):
    # Imports excluded (the first fixture pays them); the brief: both stages, both variants, < 1 min.
    assert stage_c_result["elapsed_s"] + stage_b_result["elapsed_s"] < 60


@pytest.mark.parametrize("result_fixture", ["stage_c_result", "stage_b_result"])
def test_reference_and_ours_see_the_same_network_input_shapes(result_fixture, request):
    runs = request.getfixturevalue(result_fixture)["runs"]
    shapes = [run["network_inputs"] for run in runs]
    assert shapes[0], "no network input shapes were recorded"
    assert all(s == shapes[0] for s in shapes), shapes


def test_stage_c_inputs_have_the_tiny_shapes(stage_c_result):
    batch = stage_c_result["setup"]["batch"]
    # tiny: compressor at 96 px → 16×3×3; tiny text encoder width 64, 77 tokens.
    assert stage_c_result["runs"][0]["network_inputs"] == {"x": [batch, 16, 3, 3], "r": [batch], "c": [batch, 77, 64]}


def test_stage_b_inputs_have_the_tiny_shapes(stage_b_result):
    batch = stage_b_result["setup"]["batch"]
    # tiny: 128-px images → Stage A latent 4×32×32; compressor at 96 px → 16×3×3.
    assert stage_b_result["runs"][0]["network_inputs"] == {
        "x": [batch, 4, 32, 32], "r": [batch], "effnet": [batch, 16, 3, 3], "clip": [batch, 77, 64],
    }


def test_ours_and_the_reference_count_the_same_model_flops(stage_c_result, stage_b_result):
    for result in (stage_c_result, stage_b_result):
        assert len({run["flops_per_step"] for run in result["runs"]}) == 1


def test_host_syncs_are_counted_with_their_call_sites(stage_c_result):
    ours = stage_c_result["runs"][0]
    assert ours["host_syncs"] >= 1
    assert sum(ours["host_sync_sites"].values()) <= ours["host_syncs"]
    assert any(site.startswith("train/") for site in ours["host_sync_sites"])
    reference = stage_c_result["runs"][-1]
    # The official scripts read loss, loss_adjusted and grad_norm every iteration.
    assert sum(n for site, n in reference["host_sync_sites"].items() if "reference_loop.py" in site) >= 3


def test_json_holds_the_printed_result(stage_c_result):
    written = json.loads(Path(stage_c_result["json"]).read_text())
    assert [r["run"] for r in written["runs"]] == [r["run"] for r in stage_c_result["runs"]]
    assert written["setup"]["device_name"] == "CPU"
    assert written["runs"][0]["samples_per_s"] == pytest.approx(stage_c_result["runs"][0]["samples_per_s"])


def test_projection_scales_the_paper_stage_c_recipe_by_measured_throughput(stage_c_result):
    # paper_v2 Stage C: 500k + 364k + 4k steps at 1,536 and 50k at 384 samples (REFERENCE.md recipe).
    samples = 500_000 * 1536 + 364_000 * 1536 + 4_000 * 1536 + 50_000 * 384
    for run in stage_c_result["runs"]:
        projection = stage_c_result["projection"][run["run"]]
        assert projection["total"]["samples"] == samples
        assert projection["total"]["device_hours"] == pytest.approx(samples / run["samples_per_s"] / 3600, rel=1e-3)
    assert "Projected paper_v2 Stage C recipe" in stage_c_result["stdout"]
    assert "24,602 A100 hours" in stage_c_result["stdout"]


def test_stage_b_from_cache_is_refused_naming_the_module(capsys, tiny_args):
    from benchmarks.bench_train_step import parse_args

    with pytest.raises(SystemExit):
        parse_args([*tiny_args, "--stage", "b", "--from", "cache"])
    assert "stage_b_module.py has no cached-latent input" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for machines without CUDA")
def test_cuda_without_a_gpu_is_a_clear_error(capsys):
    from benchmarks.bench_train_step import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--device", "cuda"])
    assert "torch sees no CUDA device" in capsys.readouterr().err


def test_the_reference_can_be_left_out(tmp_path, tiny_args, benchmark_runner):
    result = benchmark_runner([*tiny_args, "--stage", "c", "--from", "cache", "--reference", "none",
                            "--json", str(tmp_path / "r.json")])
    assert [run["run"] for run in result["runs"]] == ["ours (cache)"]
    assert result["runs"][0]["speedup_vs_reference"] is None
    assert "| ours (cache) |" in result["table"]


def test_a_run_out_of_device_memory_is_a_table_row_not_a_crash(stage_c_result):
    from benchmarks.bench_train_step import out_of_memory_run, render_table

    error = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 26.00 GiB")
    failed = out_of_memory_run("reference (images)", "reference", "images", 24, error)
    table = render_table({**stage_c_result, "runs": [*stage_c_result["runs"][:1], failed]})
    assert "| reference (images) |  | out of memory at batch 24 |" in table
    assert failed["detail"] == "CUDA out of memory. Tried to allocate 26.00 GiB"


@pytest.mark.parametrize(
    ("stage", "latent", "phase", "compressor_size", "image_size", "batch"),
    [
        ("c", 12, "stage_c_p1", 384, None, 24),  # 1,536 / 64 GPUs
        ("c", 24, "stage_c_p2", 768, None, 24),
        ("b", 12, "stage_b_512", 384, 512, 8),  # 512 / 64
        ("b", 24, "stage_b", 768, 1024, 2),  # stage_b_1024: 128 / 64
    ],
)
def test_paper_sizes_follow_the_recipe(tmp_path, stage, latent, phase, compressor_size, image_size, batch):
    from benchmarks.bench_train_step import compose_config, parse_args, per_device_batch, stage_sizes

    args = parse_args(["--config", "paper", "--stage", stage, "--latent", str(latent), "--device", "cpu"])
    cfg = compose_config("paper", stage, latent, tmp_path, args)
    sizes = stage_sizes(cfg, stage, latent)
    assert cfg.phase == phase
    assert sizes["compressor_size"] == compressor_size and sizes.get("image_size") == image_size
    assert per_device_batch(cfg, args) == batch
    # Random-init encoders: nothing is downloaded.
    assert cfg.stage.module.text_encoder.pretrained is None
