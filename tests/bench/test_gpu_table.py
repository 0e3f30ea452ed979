"""benchmarks/gpu_table.sh: refuses clearly without a GPU; its table is built from bench_train_step's JSON."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the script would run for minutes")
def test_the_script_stops_at_once_naming_the_missing_gpu(tmp_path):
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_table.sh"), str(tmp_path / "out")], cwd=REPO,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2
    assert "no CUDA GPU visible" in done.stderr
    assert not list((tmp_path / "out").glob("*.json"))


@pytest.mark.slow
def test_the_table_lists_every_setting_from_the_benchmarks_json(stage_c_result, tmp_path):
    from benchmarks.gpu_table import table

    shutil.copy(stage_c_result["json"], tmp_path / "c12.json")
    (tmp_path / "energy.json").write_text(json.dumps({
        "seconds": 30.0, "tflops": 700.0, "nvml_mean_power_w": 650.0, "sampled_power_w": 640.0,
        "board_power_w": 700.0, "board_over_measured": 700 / 650}))
    markdown, collected = table(tmp_path)
    assert "| Stage C 12×12 | ours (images) |" in markdown and "| Stage C 12×12 | reference (images) |" in markdown
    assert "not measured (no c24.json)" in markdown and "not measured (no b512_compile.json)" in markdown
    assert "board / measured = 1.08" in markdown
    measured = [row for row in collected["rows"] if row["setting"] == "Stage C 12×12"]
    assert measured and all(row["samples_per_s"] > 0 for row in measured)
