"""Chains: the tiny pipeline (A → B → C, then the manifest) as dependent jobs from the command line,
with real ``wurst-train`` stages; its chain file and status; a failed stage stops the rest."""

from __future__ import annotations

import itertools
import json
import re
import subprocess
from datetime import datetime

import pytest
from omegaconf import OmegaConf

from wurst.slurm.manifest import write_pipeline_manifest
from wurst.slurm.submit import ChainStep, chain_steps_from_spec, job_name, submit_chain

from .conftest import CHAIN_STEPS, REPO, slurm_cli, tiny_hand_off

JOBS = ["stage_a", "stage_b", "stage_c", "manifest"]
TINY_SPEC = REPO / "conf" / "slurm" / "chain" / "tiny.yaml"


def scontrol_times(job_id: str) -> tuple[datetime, datetime]:
    shown = subprocess.run(
        ["scontrol", "show", "job", "-o", job_id], check=True, capture_output=True, text=True
    ).stdout
    fields = dict(re.findall(r"(\w+)=(\S*)", shown))
    return datetime.fromisoformat(fields["StartTime"]), datetime.fromisoformat(fields["EndTime"])


def test_job_names_read_as_the_recipe():
    assert job_name("paper_v2", "stage_c_p1") == "wurst-paper_v2-stage_c_p1"


def test_overrides_after_the_spec_go_to_every_training_step_only():
    spec = OmegaConf.to_container(OmegaConf.load(TINY_SPEC), resolve=True)
    _, steps = chain_steps_from_spec(spec, append=["logger=csv", "trainer.max_steps=4"])
    assert [s.command for s in steps] == [
        "wurst-train stage=a experiment=tiny logger=csv trainer.max_steps=4",
        "wurst-train stage=b experiment=tiny logger=csv trainer.max_steps=4",
        "wurst-train stage=c experiment=tiny logger=csv trainer.max_steps=4",
        f"python -m wurst.slurm manifest {spec['output_dir']}/tiny --pipeline tiny",
    ]


def test_manifest_refuses_an_incomplete_pipeline_dir_naming_what_is_missing(tmp_path):
    tiny_hand_off(tmp_path)  # A and B exports only
    with pytest.raises(FileNotFoundError, match=r"not complete: no export in stage_c"):
        write_pipeline_manifest(tmp_path / "tiny", "tiny")


def test_chain_file_records_jobs_names_dependencies_and_run_dirs(tiny_chain):
    record = tiny_chain.record()
    assert [e["stage"] for e in record["jobs"]] == JOBS
    assert [e["job_name"] for e in record["jobs"]] == [f"wurst-tiny-{j}" for j in JOBS]
    ids = [e["job_id"] for e in record["jobs"]]
    assert [e["depends_on"] for e in record["jobs"]] == [None, *ids[:-1]]
    pipeline_dir = tiny_chain.pipeline_dir
    assert [e["run_dir"] for e in record["jobs"]] == [str(pipeline_dir / s) for s in JOBS[:3]] + [
        str(pipeline_dir)
    ]
    assert tiny_chain.submitted.splitlines()[0].split("\t") == [
        ids[0],
        "wurst-tiny-stage_a",
        str(pipeline_dir / "stage_a"),
    ]


def test_status_right_after_submission_shows_the_chain_waiting_on_stage_a(tiny_chain):
    headline, _, *rows = tiny_chain.status_at_submission.splitlines()
    assert headline.startswith(f"chain tiny ({tiny_chain.chain_file}): 0/4 done, at stage_a: ")
    states = {row.split()[0]: row.split()[3] for row in rows}
    assert states["stage_a"] in ("PENDING", "RUNNING")
    assert [states[j] for j in JOBS[1:]] == ["PENDING"] * 3
    assert all("Dependency" in row for row in rows[1:])


@pytest.fixture(scope="module")
def finished_chain(tiny_chain):
    status = slurm_cli("status", str(tiny_chain.chain_file), "--watch", "2", env=tiny_chain.env, timeout=600)
    logs = "\n".join(p.read_text()[-2000:] for p in sorted((tiny_chain.pipeline_dir / "logs").glob("*.out")))
    assert status.returncode == 0, status.stdout[-2000:] + logs
    return tiny_chain, status.stdout


@pytest.mark.slow
def test_status_watch_ends_when_the_chain_finished(finished_chain):
    _, watched = finished_chain
    final = watched.strip().split("\n\n")[-1].splitlines()
    assert final[0].endswith("4/4 done, finished")
    assert [line.split()[3] for line in final[2:]] == ["COMPLETED"] * 4


@pytest.mark.slow
def test_each_job_starts_only_after_the_previous_one_succeeded(finished_chain):
    chain, _ = finished_chain
    times = [scontrol_times(e["job_id"]) for e in chain.record()["jobs"]]
    for (_, previous_end), (start, _) in itertools.pairwise(times):
        assert start >= previous_end


@pytest.mark.slow
def test_each_stage_trains_from_the_previous_export_into_one_pipeline_dir(finished_chain):
    chain, _ = finished_chain
    root = chain.pipeline_dir
    provenance = {
        s: json.loads((root / f"stage_{s}" / "export" / "provenance.json").read_text()) for s in "abc"
    }
    assert {s: p["steps"] for s, p in provenance.items()} == {
        "a": CHAIN_STEPS,
        "b": CHAIN_STEPS,
        "c": CHAIN_STEPS,
    }
    assert provenance["b"]["config"]["stage"]["module"]["stage_a_export"] == str(root / "stage_a" / "export")
    assert provenance["c"]["config"]["stage"]["module"]["compressor_export"] == str(
        root / "stage_b" / "export"
    )
    assert all(p["accounting"]["segments"] == 1 for p in provenance.values())


@pytest.mark.slow
def test_chain_leaves_a_complete_pipeline_dir(finished_chain):
    chain, _ = finished_chain
    root = chain.pipeline_dir
    files = {s: {p.name for p in (root / f"stage_{s}" / "export").iterdir()} for s in "abc"}
    assert {"model.safetensors", "config.json", "provenance.json"} <= files["a"]
    assert {"model.safetensors", "compressor.safetensors", "compressor_config.json"} <= files["b"]
    assert {"model.safetensors", "config.json", "hand_off.json"} <= files["c"]
    manifest = json.loads((root / "pipeline.json").read_text())
    assert manifest["pipeline"] == "tiny"
    assert manifest["stages"] == {s: str(root / f"stage_{s}") for s in "abc"}
    assert manifest["chain"]["chain_file"] == str(chain.chain_file)
    assert manifest["chain"]["slurm_job_id"] == chain.record()["jobs"][-1]["job_id"]


def test_failed_chain_is_submitted_without_stage_a(failed_chain):
    assert [e["stage"] for e in failed_chain.record()["jobs"]] == JOBS[1:]


@pytest.mark.slow
def test_a_failed_stage_cancels_the_rest_of_the_chain(failed_chain, wait_job):
    jobs = failed_chain.record()["jobs"]
    states = [wait_job(e["job_id"], 300).state for e in jobs]
    assert states == ["FAILED", "CANCELLED", "CANCELLED"]
    [log] = (failed_chain.pipeline_dir / "logs").glob("wurst-tiny-stage_b-*.out")
    assert "Stage B trains on Stage A latents" in log.read_text()  # the hand-off check, before any training
    assert not (failed_chain.pipeline_dir / "stage_c").exists()
    status = slurm_cli("status", str(failed_chain.chain_file), env=failed_chain.env)
    assert status.returncode == 1
    assert status.stdout.splitlines()[0].endswith("0/3 done, stopped: stage_b FAILED")


def test_a_bad_step_submits_nothing(cluster, tmp_path, make_job):
    good = make_job("x", tmp_path / "a.out")
    bad = make_job("x", tmp_path / "c.out", gpus_per_node=2)
    steps = [
        ChainStep("stage_a", good, "true", str(tmp_path / "a")),
        ChainStep("stage_c", bad, "true", str(tmp_path / "c")),
    ]
    with pytest.raises(ValueError, match="chain step 'stage_c': gpus_per_node=2 but tasks_per_node=1"):
        submit_chain("tiny", steps, tmp_path / "chain.json")
    assert not (tmp_path / "chain.json").exists()
