"""kill -9 of a 2-process Stage B run (torchrun, DDP) after a periodic checkpoint, then ``resume=auto``:
the final weights of every rank and the export equal those of the uninterrupted run (``ddp_stage_b``).

The kill is SIGKILL to torchrun and to every worker (each is its own session), as a node failure would
do; it lands after ``step-4.ckpt`` appears, with 4 of the 8 steps still to run. Resuming is exact because
each step is seeded from (seed, step, rank), the checkpoint holds both ranks' data-stream positions, the
optimiser, scheduler and EMA state, and the compressor's BatchNorm statistics are the same on both ranks.
"""

from __future__ import annotations

import time

import pytest

from .conftest import (
    RUN_TIMEOUT_S,
    STEPS,
    WORLD,
    finish,
    hand_off,
    kill_tree,
    launch,
    max_abs_difference,
    stage_overrides,
    torchrun_argv,
)

pytestmark = pytest.mark.slow

KILL_AFTER = 4


def test_kill_9_and_resume_give_the_weights_of_the_uninterrupted_run(tmp_path, data_dir, ddp_stage_b):
    output_dir = hand_off(tmp_path / "outputs", "b")
    run_dir = output_dir / "tiny" / "stage_b"
    argv = torchrun_argv(stage_overrides("b", output_dir, data_dir))
    checkpoint = run_dir / "checkpoints" / f"step-{KILL_AFTER:09d}.ckpt"

    first = launch(argv, tmp_path / "first.log")
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not checkpoint.exists():  # written to a temporary file, then renamed: complete once it exists
        assert first.poll() is None, (
            f"the run ended before step {KILL_AFTER}:\n{(tmp_path / 'first.log').read_text()[-3000:]}"
        )
        assert time.monotonic() < deadline, f"no {checkpoint.name} after {RUN_TIMEOUT_S} s"
        time.sleep(0.05)
    kill_tree(first)
    assert not (run_dir / "export").exists(), "the run finished before the kill"
    assert not any((run_dir / "rank_state").glob("rank*.safetensors")), "a rank finished before the kill"

    resumed = finish(launch(argv, tmp_path / "resumed.log"), tmp_path / "resumed.log")
    assert f"resuming from {checkpoint}" in resumed

    straight, killed = ddp_stage_b.ranks, ddp_stage_b.ranks.__class__(run_dir)
    for rank in range(WORLD):
        assert killed.record(rank)["step"] == STEPS["b"]
        worst, different = max_abs_difference(straight.state(rank), killed.state(rank))
        print(f"\nrank {rank}: max |uninterrupted - killed+resumed| = {worst}")
        assert different == [], (
            f"rank {rank}: {len(different)} tensors differ (max |Δ| {worst}), e.g. {different[:4]}"
        )
    for name in ("model", "compressor"):
        assert max_abs_difference(straight.export(name), killed.export(name))[1] == [], name
