"""Sweeps: a --multirun through the submitit SLURM launcher, and the summary table of its members."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from slurm.sweep import collect_sweep, write_sweep_summary

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


@pytest.mark.timeout(300)
def test_two_member_multirun_through_the_submitit_slurm_launcher_writes_the_summary(cluster, tmp_path):
    sweep = tmp_path / "sweep"
    proc = subprocess.run(
        [
            sys.executable,
            str(HERE / "sweep_app" / "app.py"),
            "--multirun",
            "hydra/launcher=slurm_loopback",
            "lr=0.1,0.2",
            f"hydra.searchpath=[file://{REPO / 'conf'}]",
            f"hydra.sweep.dir={sweep}",
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=280,
        env=os.environ.copy(),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(sweep / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["member"], r["overrides"], r["status"]) for r in rows] == [
        ("0", "lr=0.1", "ok"),
        ("1", "lr=0.2", "ok"),
    ]
    assert float(rows[1]["loss"]) < float(rows[0]["loss"])  # lr 0.2 gets closer in 5 steps
    assert all(r["slurm_job_id"] and r["host"] in ("n1", "n2") for r in rows)  # each ran as a SLURM job
    script = next((sweep / ".submitit").glob("*/*_submission.sh"))
    directives = script.read_text().splitlines()
    # Lightning's requeue signal (not submitit's USR2), requeueable, named for squeue
    wanted = {"#SBATCH --signal=USR1@60", "#SBATCH --requeue", "#SBATCH --job-name=wurst-app"}
    assert wanted <= set(directives)
