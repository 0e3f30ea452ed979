"""Stages A, B and C on the loopback cluster: 2 SLURM nodes × 1 task each, Lightning DDP on CPU (gloo),
each stage's default tiny recipe, under tests/distributed/payloads/rank_state_train.py. Every job
completes and both ranks, one per node, end with bit-identical state (every network, EMA, BatchNorm
statistics, buffers), which rank 0 exported. Before the DDP fixes the Stage A and B jobs ended FAILED
(exit 134 for B: gloo collective mismatch). The torchrun twins of these runs are in tests/distributed."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from wurst.slurm.submit import submit

from .conftest import PYTHON, REPO

STAGES = ("a", "b", "c")


def _distributed_conftest() -> Any:
    spec = importlib.util.spec_from_file_location(
        "wurst_tests_distributed_conftest", REPO / "tests" / "distributed" / "conftest.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


DISTRIBUTED = _distributed_conftest()


def two_node_argv(stage: str, output_dir: Path, data_dir: Path) -> list[str]:
    return [
        PYTHON,
        str(DISTRIBUTED.PAYLOAD),
        "trainer=ddp",
        "trainer.num_nodes=2",
        "trainer.devices=1",
        "trainer.accelerator=cpu",
        *DISTRIBUTED.stage_overrides(stage, output_dir, data_dir),
    ]


@pytest.fixture(scope="module")
def stage_jobs(cluster, data_dir, tmp_path_factory, make_job) -> dict[str, dict[str, Any]]:
    """The three two-node jobs, submitted together so they share the two nodes' time."""
    env = {
        **yaml.safe_load((REPO / "conf" / "slurm" / "loopback.yaml").read_text())["env"],
        "OMP_NUM_THREADS": "1",
    }
    jobs = {}
    for stage in STAGES:
        root = tmp_path_factory.mktemp(f"two-node-{stage}")
        output_dir = DISTRIBUTED.hand_off(root / "outputs", stage)
        log, script = root / "job.out", root / "job.sbatch"
        job = make_job(
            f"wurst-test-ddp-{stage}", log, nodes=2, tasks_per_node=1, time="15", signal_seconds=None, env=env
        )
        job_id = submit(job, two_node_argv(stage, output_dir, data_dir), script)
        jobs[stage] = {
            "id": job_id,
            "log": log,
            "script": script,
            "run_dir": output_dir / "tiny" / f"stage_{stage}",
        }
    return jobs


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_two_nodes_end_with_identical_state_on_both_ranks(stage, stage_jobs, wait_job):
    job = stage_jobs[stage]
    status = wait_job(job["id"], 600, job["log"])
    assert status.state == "COMPLETED", job["log"].read_text()[-4000:]
    lines = job["script"].read_text().splitlines()
    assert {"#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1"} <= set(lines)

    ranks = DISTRIBUTED.RankStates(job["run_dir"])
    records = [ranks.record(rank) for rank in (0, 1)]
    assert [(r["rank"], r["world_size"], r["node"]) for r in records] == [(0, 2, "n1"), (1, 2, "n2")]
    assert {r["step"] for r in records} == {DISTRIBUTED.STEPS[stage]}
    assert {r["find_unused_parameters"] for r in records} == {False}

    states = [ranks.state(rank) for rank in (0, 1)]
    worst, different = DISTRIBUTED.max_abs_difference(*states)
    print(f"\nstage {stage.upper()} on n1+n2: {len(states[0])} tensors, max |rank0 - rank1| = {worst}")
    assert different == [], f"{len(different)} tensors differ between the nodes, e.g. {different[:4]}"
    exported = ranks.export("model")
    assert (
        DISTRIBUTED.max_abs_difference(DISTRIBUTED.with_prefix(states[0], "ema.shadow."), exported)[1] == []
    )
