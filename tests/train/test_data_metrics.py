"""``data/*`` metrics are running totals since the start of the run, continued across a resume, and
the final totals reach the export's provenance (real ``wurst-train`` runs of the tiny Stage A, with a
DataLoader worker shipping the counts, on real synthetic tar shards).

Every trained batch holds ``global_batch_size`` accepted samples, so after ``n`` steps
``data/samples_accepted`` must be ``n × batch``: a per-batch count (what was logged before) or a
missing metric (Stage A logged none) cannot pass.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BATCH = 4
FIRST_STEPS, RESUMED_STEPS = 4, 7


def stage_a(output_dir: Path, data_dir: Path, max_steps: int) -> None:
    argv = [sys.executable, "-m", "wurst.train", "stage=a", "experiment=tiny", "logger=csv",
            "callbacks.progress_bar=false", "data.num_workers=1", f"data.global_batch_size={BATCH}",
            "data.synthesize.num_samples=64", "data.synthesize.num_shards=4", f"paths.output_dir={output_dir}",
            f"paths.data_dir={data_dir}", f"trainer.max_steps={max_steps}", "trainer.log_every_n_steps=2",
            "checkpoint_every=2"]
    result = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=400,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]


def csv_column(path: Path, name: str) -> list[tuple[int, float]]:
    with open(path, newline="") as handle:
        return [(int(row["step"]), float(row[name])) for row in csv.DictReader(handle) if row.get(name)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A 4-step run (kept aside), then the same run resumed to 7 steps."""
    root = tmp_path_factory.mktemp("data_metrics")
    output, data = root / "out", root / "data"
    run_dir = output / "tiny" / "stage_a"
    stage_a(output, data, FIRST_STEPS)
    first = root / "first"
    shutil.copytree(run_dir / "export", first / "export")
    shutil.copy(run_dir / "logs" / "metrics.csv", first / "metrics.csv")
    stage_a(output, data, RESUMED_STEPS)  # resume=auto: from the step-4 checkpoint
    return {"first": first, "resumed": run_dir}


@pytest.mark.slow
def test_stage_a_logs_data_totals_on_every_logged_step_and_the_last(runs):
    accepted = csv_column(runs["first"] / "metrics.csv", "data/samples_accepted")
    # Lightning's step column is the 0-based batch: rows at its log steps (1, 3) and the last batch (3).
    assert accepted and all(value == (step + 1) * BATCH for step, value in accepted)
    assert accepted[-1] == (FIRST_STEPS - 1, FIRST_STEPS * BATCH)
    read = csv_column(runs["first"] / "metrics.csv", "data/samples_read")
    assert [v for _, v in read] == sorted(v for _, v in read) and read[-1][1] >= FIRST_STEPS * BATCH


@pytest.mark.slow
def test_the_final_totals_are_in_the_provenance(runs):
    provenance = json.loads((runs["first"] / "export" / "provenance.json").read_text())
    assert provenance["metrics"]["data/samples_accepted"] == FIRST_STEPS * BATCH
    counts = provenance["dataset"]["counts"]
    assert {k: v for k, v in provenance["metrics"].items() if k.startswith("data/")} == {
        f"data/{kind}": float(n) for kind, n in counts.items()}


@pytest.mark.slow
def test_a_resumed_run_continues_the_totals(runs):
    provenance = json.loads((runs["resumed"] / "export" / "provenance.json").read_text())
    assert provenance["steps"] == RESUMED_STEPS
    assert provenance["metrics"]["data/samples_accepted"] == RESUMED_STEPS * BATCH
    first = json.loads((runs["first"] / "export" / "provenance.json").read_text())["metrics"]
    assert provenance["metrics"]["data/samples_read"] >= first["data/samples_read"]
    after_resume = [(s, v) for s, v in csv_column(runs["resumed"] / "logs" / "metrics.csv", "data/samples_accepted")
                    if s >= FIRST_STEPS]
    assert after_resume and all(value == (step + 1) * BATCH for step, value in after_resume)


@pytest.mark.slow
def test_under_ddp_the_totals_are_of_all_ranks_in_metrics_and_provenance(tmp_path):
    # Two CPU ranks (gloo), each reading its own share of the stream with its own worker.
    argv = [sys.executable, "-m", "wurst.train", "stage=a", "experiment=tiny", "trainer=ddp",
            "trainer.accelerator=cpu", "trainer.devices=2", "logger=csv", "callbacks.progress_bar=false",
            "data.num_workers=1", f"data.global_batch_size={BATCH}", "data.synthesize.num_samples=64",
            "data.synthesize.num_shards=4", f"paths.output_dir={tmp_path / 'out'}",
            f"paths.data_dir={tmp_path / 'data'}", "trainer.max_steps=3", "trainer.log_every_n_steps=2"]
    result = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=400,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    provenance = json.loads((tmp_path / "out" / "tiny" / "stage_a" / "export" / "provenance.json").read_text())
    assert provenance["metrics"]["data/samples_accepted"] == 3 * BATCH  # both ranks' halves of each batch
    assert provenance["dataset"]["counts"]["samples_accepted"] == 3 * BATCH
    assert {k: v for k, v in provenance["metrics"].items() if k.startswith("data/")} == {
        f"data/{kind}": float(n) for kind, n in provenance["dataset"]["counts"].items()}


@pytest.mark.slow
def test_pipeline_json_carries_every_stages_totals(tmp_path):
    # The A -> B -> C pipeline for 2 steps a stage: pipeline.json's per-stage metrics are the totals.
    argv = [sys.executable, "-m", "wurst.train", "pipeline=tiny", "logger=csv", "callbacks.progress_bar=false",
            f"paths.output_dir={tmp_path / 'out'}", f"paths.data_dir={tmp_path / 'data'}",
            "data.synthesize.num_samples=64", "data.synthesize.num_shards=4", f"data.global_batch_size={BATCH}",
            "data.num_workers=0", "trainer.max_steps=2", "pipeline.report.prompt_check=false"]
    result = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((tmp_path / "out" / "tiny" / "pipeline.json").read_text())
    assert {stage: metrics.get("data/samples_accepted") for stage, metrics in manifest["metrics"].items()} == {
        "stage_a": 2 * BATCH, "stage_b": 2 * BATCH, "stage_c": 2 * BATCH}
