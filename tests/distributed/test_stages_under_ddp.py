"""Stages A, B and C train with their default tiny recipe on 2 processes (torchrun, Lightning DDP, gloo)
and end with the same state on every rank: every network, the EMA copy, BatchNorm statistics and the
other buffers are bit-identical, and rank 0's export is that state.

Before the fixes: Stage B aborted with a gloo collective mismatch the first time one rank zeroed its
compressor latents and the other did not (that rank's compressor had no gradient, so the ranks' DDP
buckets went out of step); Stage A stopped at its first step with Lightning's unused-parameters error
(the discriminator is idle before ``disc_start``); Stage B's compressor BatchNorm and Stage A's latent
BatchNorm and latent std ended with each rank's own statistics.
"""

from __future__ import annotations

import csv

import pytest

from .conftest import STEPS, WORLD, max_abs_difference, with_prefix

pytestmark = pytest.mark.slow


def assert_identical_ranks(run) -> None:
    states = [run.ranks.state(rank) for rank in range(WORLD)]
    worst, different = max_abs_difference(states[0], states[1])
    print(
        f"\nstage {run.stage.upper()}: {len(states[0])} tensors, max |rank0 - rank1| = {worst} "
        f"after {STEPS[run.stage]} steps ({run.seconds:.0f} s)"
    )
    assert different == [], (
        f"{len(different)} tensors differ between the ranks (max |Δ| {worst}), e.g. {different[:4]}"
    )


def assert_ddp_without_unused_parameter_search(run) -> None:
    records = [run.ranks.record(rank) for rank in range(WORLD)]
    assert [(r["rank"], r["world_size"], r["step"]) for r in records] == [
        (0, 2, STEPS[run.stage]),
        (1, 2, STEPS[run.stage]),
    ]
    # The fast path: DDP does not traverse the graph for unused parameters.
    assert {r["find_unused_parameters"] for r in records} == {False}


def test_stage_a_ranks_end_identical_through_both_discriminator_phases(ddp_stage_a):
    assert_ddp_without_unused_parameter_search(ddp_stage_a)
    assert_identical_ranks(ddp_stage_a)
    with open(ddp_stage_a.run_dir / "logs" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert any(row.get("train/d_loss") for row in rows), "no step trained the discriminator"
    state = ddp_stage_a.ranks.state(0)
    assert max_abs_difference(with_prefix(state, "ema.shadow."), ddp_stage_a.ranks.export("model"))[1] == []


def test_stage_b_ranks_end_identical_after_a_one_rank_zeroed_compressor_batch(ddp_stage_b):
    draws = [
        {d["step"]: d["zeroed"] for d in ddp_stage_b.ranks.lines(rank, "draws")} for rank in range(WORLD)
    ]
    one_rank_only = [step for step in draws[0] if draws[0][step] != draws[1][step]]
    assert one_rank_only, f"no step zeroed the compressor latents on one rank only: {draws}"
    assert_ddp_without_unused_parameter_search(ddp_stage_b)
    assert_identical_ranks(ddp_stage_b)
    state = ddp_stage_b.ranks.state(0)
    assert (
        max_abs_difference(with_prefix(state, "compressor."), ddp_stage_b.ranks.export("compressor"))[1] == []
    )
    assert max_abs_difference(with_prefix(state, "ema.shadow."), ddp_stage_b.ranks.export("model"))[1] == []


def test_stage_c_ranks_end_identical(ddp_stage_c):
    assert_ddp_without_unused_parameter_search(ddp_stage_c)
    assert_identical_ranks(ddp_stage_c)
    state = ddp_stage_c.ranks.state(0)
    assert max_abs_difference(with_prefix(state, "ema.shadow."), ddp_stage_c.ranks.export("model"))[1] == []
