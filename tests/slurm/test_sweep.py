"""Sweeps: a --multirun through the submitit SLURM launcher, and the summary table of its members."""

from __future__ import annotations

import csv
import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from wurst.slurm.sweep import collect_sweep, write_sweep_summary

from .conftest import SWEEP_LRS, VENV_BIN, tiny_hand_off

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def fake_member(sweep: Path, num: int, overrides: list[str], metrics: dict | None) -> Path:
    member = sweep / str(num)
    (member / ".hydra").mkdir(parents=True)
    (member / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if metrics is not None:
        (member / "metrics.json").write_text(json.dumps(metrics))
    return member


def test_summary_has_one_row_per_member_with_its_overrides_and_metrics(tmp_path):
    fake_member(tmp_path, 0, ["lr=0.1"], {"loss": 0.5, "fid": 30.25})
    fake_member(tmp_path, 1, ["lr=0.2"], {"loss": 0.25})
    fake_member(tmp_path, 10, ["lr=0.3"], None)
    md_path, csv_path = write_sweep_summary(tmp_path)
    with open(csv_path, newline="") as f:
        rows = list(csv.reader(f))
    assert rows == [
        ["member", "overrides", "fid", "loss", "status"],
        ["0", "lr=0.1", "30.25", "0.5", "ok"],
        ["1", "lr=0.2", "", "0.25", "ok"],
        ["10", "lr=0.3", "", "", "no metrics.json"],
    ]
    md = md_path.read_text().splitlines()
    assert md[2:4] == ["| member | overrides | fid | loss | status |", "|---|---|---|---|---|"]
    assert md[4] == "| 0 | lr=0.1 | 30.25 | 0.5 | ok |"


def test_members_without_metrics_json_fall_back_to_the_csv_logger(tmp_path):
    member = fake_member(tmp_path, 0, ["lr=0.1"], None)
    (member / "logs").mkdir()
    (member / "logs" / "metrics.csv").write_text("step,train/loss,val/fid\n0,1.5,\n99,0.75,\n99,,20.5\n")
    [row] = collect_sweep(tmp_path)
    assert row["metrics"] == {"step": 99, "train/loss": 0.75, "val/fid": 20.5}
    assert row["status"] == "ok (metrics.csv)"


def test_summary_of_a_directory_without_members_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="no sweep members under"):
        write_sweep_summary(tmp_path)


def test_sweep_is_launched_through_submitit_onto_the_cluster(tiny_sweep):
    assert tiny_sweep.process.args[1:3] == ["--multirun", "hydra/launcher=slurm_loopback"]


@pytest.fixture(scope="module")
def finished_sweep(tiny_sweep):
    returncode = tiny_sweep.wait(480)
    assert returncode == 0, tiny_sweep.log.read_text()[-3000:]
    return tiny_sweep


@pytest.mark.slow
def test_two_member_wurst_train_sweep_through_the_submitit_slurm_launcher_writes_the_summary(finished_sweep):
    with open(finished_sweep.sweep_dir / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["member"], r["status"]) for r in rows] == [("0", "ok"), ("1", "ok")]
    assert [r["overrides"].split()[2] for r in rows] == [f"optim.lr={lr}" for lr in SWEEP_LRS]
    assert all(float(r["train/loss"]) > 0 for r in rows)
    assert "| member | overrides |" in (finished_sweep.sweep_dir / "summary.md").read_text()


@pytest.mark.slow
def test_each_sweep_member_ran_as_a_slurm_job_in_its_own_run_dir(finished_sweep):
    sweep_name = finished_sweep.sweep_dir.name
    for member, lr in enumerate(SWEEP_LRS):
        run_dir = finished_sweep.output_dir / "tiny" / "sweeps" / sweep_name / str(member) / "stage_c"
        provenance = json.loads((run_dir / "export" / "provenance.json").read_text())
        assert provenance["steps"] == 4 and provenance["config"]["optim"]["lr"] == float(lr)
    logs = sorted((finished_sweep.sweep_dir / ".submitit").glob("*/*_log.out"))
    assert len(logs) == 2  # one array task per member
    script = next((finished_sweep.sweep_dir / ".submitit").glob("*/*_submission.sh"))
    directives = set(script.read_text().splitlines())
    # Lightning's requeue signal (not submitit's USR2), requeueable, named for squeue
    assert {"#SBATCH --signal=USR1@60", "#SBATCH --requeue", "#SBATCH --job-name=wurst-tiny"} <= directives


# -- a real Hydra --multirun on the basic launcher: the summary holds each member's final metrics ---
LOCAL_STEPS, LOCAL_BATCH, TINY_WARMUP = 3, 4, 20  # conf/experiment/tiny.yaml: optim.warmup_steps=20


@pytest.fixture(scope="module")
def local_sweep(data_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("local_sweep")
    output_dir = tiny_hand_off(root / "outputs")
    sweep_dir = root / "sweep"
    argv = [str(VENV_BIN / "wurst-train"), "--multirun", "stage=c", "experiment=tiny",
            f"optim.lr={','.join(SWEEP_LRS)}", f"paths.output_dir={output_dir}", f"paths.data_dir={data_dir}",
            "logger=csv", "callbacks.progress_bar=false", f"trainer.max_steps={LOCAL_STEPS}", "checkpoint_every=100",
            f"data.global_batch_size={LOCAL_BATCH}", "data.num_workers=0", f"hydra.sweep.dir={sweep_dir}"]
    result = subprocess.run(argv, cwd=REPO, check=False, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return sweep_dir


@pytest.mark.slow
def test_the_multirun_summary_shows_each_members_final_learning_rate_not_step_0s(local_sweep):
    with open(local_sweep / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["status"] for r in rows] == ["ok", "ok"]
    for row, lr in zip(rows, SWEEP_LRS):
        # linear warm-up: the last of 3 steps runs at lr x 3/20 (step 0 at lr x 1/20)
        assert float(row["train/lr"]) == pytest.approx(float(lr) * LOCAL_STEPS / TINY_WARMUP)
        assert float(row["train/grad_norm"]) > 0


@pytest.mark.slow
def test_the_multirun_summary_shows_each_members_data_totals(local_sweep):
    with open(local_sweep / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        assert float(row["data/samples_accepted"]) == LOCAL_STEPS * LOCAL_BATCH
        assert float(row["data/samples_read"]) >= LOCAL_STEPS * LOCAL_BATCH
