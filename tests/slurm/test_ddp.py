"""Two-node DDP through our template: 2 SLURM nodes x 1 task, Lightning on CPU (gloo)."""

from __future__ import annotations

import json

import pytest

from slurm.submit import submit


@pytest.fixture(scope="module")
def ddp_run(cluster, tmp_path_factory, make_job, lightning_job_command, wait_job):
    root = tmp_path_factory.mktemp("ddp")
    run_dir, log = root / "run", root / "job.out"
    job = make_job("wurst-test-ddp", log, nodes=2, tasks_per_node=1, time="10", signal_seconds=None)
    command = lightning_job_command(
        run_dir, num_nodes=2, devices=1, max_steps=8, batch_size=4, ckpt_every=100
    )
    status = wait_job(submit(job, command, root / "job.sbatch"), 240, log)
    assert status.state == "COMPLETED", log.read_text()
    ranks = [json.loads((run_dir / f"final-rank{r}.json").read_text()) for r in (0, 1)]
    return ranks, log.read_text()


@pytest.mark.slow
def test_each_rank_runs_on_its_own_node_in_a_world_of_two(ddp_run):
    ranks, log = ddp_run
    assert [(r["rank"], r["world_size"], r["node"]) for r in ranks] == [(0, 2, "n1"), (1, 2, "n2")]
    assert "distributed_backend=gloo" in log


@pytest.mark.slow
def test_both_ranks_train_every_step_on_disjoint_samples(ddp_run):
    ranks, _ = ddp_run
    assert [r["global_step"] for r in ranks] == [8, 8]
    assert [len(r["seen_indices"]) for r in ranks] == [8 * 4, 8 * 4]
    assert not set(ranks[0]["seen_indices"]) & set(ranks[1]["seen_indices"])


@pytest.mark.slow
def test_both_ranks_end_with_identical_weights(ddp_run):
    ranks, _ = ddp_run
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]
