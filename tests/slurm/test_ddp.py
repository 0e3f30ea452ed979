"""Two-node DDP through our template: a tiny Stage C ``wurst-train`` on 2 SLURM nodes × 1 task, Lightning
DDP on CPU (gloo). Rank 1 writes nothing of its own in DDP, so RankRecorder (tests/slurm/payloads)
reports what each rank trained on and the weights it ended with."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from .conftest import DDP_STEPS, TINY_C_GLOBAL_BATCH, load_observed_train

PER_RANK_BATCH = TINY_C_GLOBAL_BATCH // 2


@pytest.fixture(scope="module")
def finished_ddp_run(ddp_run):
    status = ddp_run.wait(420)
    assert status.state == "COMPLETED", ddp_run.log.read_text()[-3000:]
    return ddp_run


def test_ddp_job_asks_for_two_nodes_with_one_task_each(ddp_run):
    lines = ddp_run.script.read_text().splitlines()
    assert {"#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1"} <= set(lines)
    [srun] = [line for line in lines if line.startswith("srun ")]
    assert "trainer=ddp trainer.num_nodes=2 trainer.devices=1" in srun


@pytest.mark.slow
def test_each_rank_trains_on_its_own_node_in_a_gloo_world_of_two(finished_ddp_run):
    starts = [finished_ddp_run.events(rank, "start") for rank in (0, 1)]
    assert [(s[0]["rank"], s[0]["world_size"], s[0]["node"]) for s in starts] == [(0, 2, "n1"), (1, 2, "n2")]
    assert "distributed_backend=gloo" in finished_ddp_run.log.read_text()


@pytest.mark.slow
def test_ranks_train_every_step_on_disjoint_shards(finished_ddp_run):
    batches = [finished_ddp_run.events(rank, "batch") for rank in (0, 1)]
    assert [[b["step"] for b in rank] for rank in batches] == [list(range(DDP_STEPS))] * 2
    assert all(len(b["keys"]) == PER_RANK_BATCH for rank in batches for b in rank)
    # Finite mode: every epoch the 4 shards are shuffled alike on all ranks, then dealt out, 2 per rank
    # (32 samples each: 8 steps of 8). Synthetic keys are <5-digit shard><4-digit sample>.
    for epoch in (0, 1):
        keys = [{k for b in rank if b["epoch"] == epoch for k in b["keys"]} for rank in batches]
        shards = [{k[:5] for k in rank_keys} for rank_keys in keys]
        assert not keys[0] & keys[1] and not shards[0] & shards[1], epoch
        if epoch == 0:  # a whole epoch: all four shards, two per rank
            assert [len(s) for s in shards] == [2, 2] and len(keys[0]) == len(keys[1]) == 64


@pytest.mark.slow
def test_checkpoint_holds_the_data_position_of_both_ranks(finished_ddp_run):
    last = finished_ddp_run.run_dir / "checkpoints" / f"step-{DDP_STEPS:09d}.ckpt"
    position = torch.load(last, map_location="cpu", weights_only=True)["WurstDataModule"]["position"]
    assert sorted(position["readers"]) == ["0/0", "1/0"] and position["layout"]["world_size"] == 2


@pytest.mark.slow
def test_both_ranks_end_with_identical_weights_which_are_the_export(finished_ddp_run):
    ends = [finished_ddp_run.events(rank, "end")[-1] for rank in (0, 1)]
    assert [e["step"] for e in ends] == [DDP_STEPS, DDP_STEPS]
    assert ends[0]["network_sha256"] == ends[1]["network_sha256"]
    assert ends[0]["export_sha256"] == ends[1]["export_sha256"]
    exported = load_file(str(finished_ddp_run.run_dir / "export" / "model.safetensors"))
    assert load_observed_train().weights_sha256(exported) == ends[0]["export_sha256"]


@pytest.mark.slow
def test_ledger_counts_both_ranks(finished_ddp_run):
    provenance = finished_ddp_run.provenance()
    assert provenance["accounting"]["world_size"] == 2 and provenance["accounting"]["segments"] == 1
    assert provenance["samples_seen"] == DDP_STEPS * TINY_C_GLOBAL_BATCH
