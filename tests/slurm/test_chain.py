"""Chains: the pipeline as dependent jobs (afterok), persisted to a chain file, and its status."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest

from slurm.submit import ChainRecord, ChainStep, chain_status, format_chain_status, job_name, submit_chain

HERE = Path(__file__).resolve().parent
STANDIN = HERE / "payloads" / "stage_standin.py"
STAGES = ["stage_a", "stage_b", "stage_c"]


def standin_command(pipeline_dir: Path, stage: str, needs: str | None, *extra: str) -> list[str]:
    argv = [sys.executable, str(STANDIN), "--pipeline-dir", str(pipeline_dir), "--stage", stage]
    return argv + (["--needs", needs] if needs else []) + list(extra)


def tiny_chain(tmp_path: Path, make_job, fail: str | None = None) -> list[ChainStep]:
    pipeline_dir = tmp_path / "pipeline"
    steps = []
    for i, stage in enumerate(STAGES):
        extra = ["--fail"] if stage == fail else []
        if stage == STAGES[-1]:
            extra += ["--pipeline-json", *STAGES]
        # Each stage asks for other resources: the chain carries them per job.
        job = make_job("ignored", tmp_path / "logs" / f"{stage}.out", cpus_per_task=i + 1)
        steps.append(
            ChainStep(
                stage,
                job,
                standin_command(pipeline_dir, stage, STAGES[i - 1] if i else None, *extra),
                str(pipeline_dir / stage),
            )
        )
    return steps


def test_job_names_read_as_the_recipe():
    assert job_name("paper_v2", "stage_c_p1") == "wurst-paper_v2-stage_c_p1"


def test_chain_runs_the_stages_in_order_and_leaves_a_complete_pipeline_dir(
    cluster, tmp_path, make_job, wait_job
):
    record = submit_chain("tiny", tiny_chain(tmp_path, make_job), tmp_path / "chain.json")
    for entry in record.jobs:
        assert (
            wait_job(entry["job_id"], 120, tmp_path / "logs" / f"{entry['stage']}.out").state == "COMPLETED"
        )
    pipeline_dir = tmp_path / "pipeline"
    provenance = [json.loads((pipeline_dir / s / "export" / "provenance.json").read_text()) for s in STAGES]
    for earlier, later in itertools.pairwise(provenance):
        assert later["started"] >= earlier["finished"]  # afterok: B started only after A succeeded
    for stage in STAGES:
        assert {p.name for p in (pipeline_dir / stage / "export").iterdir()} == {
            "model.safetensors",
            "config.json",
            "provenance.json",
        }
    assert json.loads((pipeline_dir / "pipeline.json").read_text()) == {"stages": STAGES}


def test_chain_file_records_ids_names_dependencies_and_run_dirs(cluster, tmp_path, make_job, wait_job):
    record = submit_chain("tiny", tiny_chain(tmp_path, make_job), tmp_path / "chain.json")
    saved = ChainRecord.load(tmp_path / "chain.json")
    assert saved.job_ids == record.job_ids
    assert [e["job_name"] for e in saved.jobs] == [
        "wurst-tiny-stage_a",
        "wurst-tiny-stage_b",
        "wurst-tiny-stage_c",
    ]
    assert [e["depends_on"] for e in saved.jobs] == [None, *record.job_ids[:2]]
    assert [e["run_dir"] for e in saved.jobs] == [str(tmp_path / "pipeline" / s) for s in STAGES]
    scontrol = subprocess.run(
        ["scontrol", "show", "job", "-o", record.job_ids[2]], check=False, capture_output=True, text=True
    )
    assert "JobName=wurst-tiny-stage_c" in scontrol.stdout and "NumCPUs=3" in scontrol.stdout
    for job_id in record.job_ids:
        wait_job(job_id, 120)


def test_failed_stage_cancels_the_rest_of_the_chain(cluster, tmp_path, make_job, wait_job):
    record = submit_chain("tiny", tiny_chain(tmp_path, make_job, fail="stage_b"), tmp_path / "chain.json")
    states = [wait_job(job_id, 120).state for job_id in record.job_ids]
    assert states == ["COMPLETED", "FAILED", "CANCELLED"]
    assert not (tmp_path / "pipeline" / "stage_c").exists()  # C never ran
    assert (
        format_chain_status(tmp_path / "chain.json")
        .splitlines()[0]
        .endswith("1/3 done, stopped: stage_b FAILED")
    )


@pytest.mark.slow
def test_status_shows_where_a_running_chain_is(cluster, tmp_path, make_job, wait_job):
    steps = tiny_chain(tmp_path, make_job)
    steps[0] = ChainStep(
        steps[0].stage, steps[0].job, [*steps[0].command, "--seconds", "8"], steps[0].run_dir
    )
    record = submit_chain("tiny", steps, tmp_path / "chain.json")
    rows = chain_status(tmp_path / "chain.json")
    assert [r["state"] for r in rows][1:] == ["PENDING", "PENDING"]
    assert rows[1]["reason"] == "Dependency"
    assert rows[0]["state"] in ("PENDING", "RUNNING")
    headline = format_chain_status(tmp_path / "chain.json").splitlines()[0]
    assert headline.startswith(f"chain tiny ({tmp_path / 'chain.json'}): 0/3 done, at stage_a: ")
    for job_id in record.job_ids:
        wait_job(job_id, 120)


def test_chain_and_status_from_the_command_line(cluster, tmp_path):
    pipeline_dir = tmp_path / "pipeline"
    spec = {
        "pipeline": "cli",
        "slurm": {
            "partition": "debug",
            "time": "10",
            "cpus_per_task": 1,
            "tasks_per_node": 1,
            "gpus_per_node": 0,
            "output": str(tmp_path / "logs" / "%x-%j.out"),
        },
        "steps": [
            {
                "stage": s,
                "run_dir": str(pipeline_dir / s),
                "command": standin_command(pipeline_dir, s, STAGES[i - 1] if i else None),
            }
            for i, s in enumerate(STAGES)
        ],
    }
    (tmp_path / "spec.yaml").write_text(json.dumps(spec))  # JSON is YAML
    chain = subprocess.run(
        [
            sys.executable,
            "-m",
            "slurm",
            "chain",
            str(tmp_path / "spec.yaml"),
            "--chain-file",
            str(tmp_path / "chain.json"),
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert chain.returncode == 0, chain.stderr
    assert [line.split("\t")[1] for line in chain.stdout.splitlines()[:3]] == [
        f"wurst-cli-{s}" for s in STAGES
    ]
    status = subprocess.run(
        [sys.executable, "-m", "slurm", "status", str(tmp_path / "chain.json"), "--watch", "1"],
        check=False,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert status.returncode == 0, status.stdout + status.stderr
    final = status.stdout.strip().split("\n\n")[-1].splitlines()
    assert final[0].endswith("3/3 done, finished")
    assert [line.split()[3] for line in final[2:]] == ["COMPLETED"] * 3


def test_a_bad_step_submits_nothing(cluster, tmp_path, make_job):
    steps = tiny_chain(tmp_path, make_job)
    steps[2] = ChainStep(
        "stage_c", make_job("x", tmp_path / "c.out", gpus_per_node=2), "true", str(tmp_path / "c")
    )
    with pytest.raises(ValueError, match="chain step 'stage_c': gpus_per_node=2 but tasks_per_node=1"):
        submit_chain("tiny", steps, tmp_path / "chain.json")
    assert not (tmp_path / "chain.json").exists()
