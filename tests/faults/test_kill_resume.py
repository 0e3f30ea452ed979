"""kill -9 at ten seeded points of one tiny Stage C run, each followed by ``resume=auto``: the final
weights equal an uninterrupted run's, no checkpoint is ever unreadable, and a kill costs at most the
steps since the last checkpoint.

The kills are chained in one run directory (kill, resume, kill, ..., finish). The first lands while
the run writes its synthetic shards (data preparation); the other nine are drawn from a seeded RNG,
three of each kind: inside a training step (after backward, before the update), while loading data
(decoding an image for the next batch), and inside a checkpoint write (temporary file half written).
"""

from __future__ import annotations

import random

import pytest
import torch
from safetensors.torch import load_file

from wurst.train.checkpointing import find_resume_checkpoint

from .conftest import (
    checkpoint_step,
    stage_c_argv,
    stage_c_dir,
    unreadable_checkpoints,
    wait_for_event,
    write_hand_off_exports,
)

pytestmark = pytest.mark.slow

STEPS, EVERY, SEED = 30, 3, 4
SAMPLES, SHARDS = 64, 4


def kill_points(seed: int = SEED) -> list[dict]:
    """Ten kill points in run order: data preparation, then nine seeded ones with increasing steps.

    Point i of the nine falls in steps [3i + 1, 3i + 3]; a ``save`` point is that window's checkpoint.
    """
    rng = random.Random(seed)
    per_shard = SAMPLES // SHARDS
    points = [{"point": "prepare", "image": per_shard + rng.randint(1, per_shard - 1)}]
    kinds = ["step", "data", "save"] * 3
    rng.shuffle(kinds)
    for i, kind in enumerate(kinds):
        low, high = EVERY * i + 1, EVERY * i + EVERY
        points.append({"point": kind, "step": high if kind == "save" else rng.randint(low, high)})
    return points


def test_the_kill_points_are_reproducible_and_cover_every_kind():
    points = kill_points()
    assert points == kill_points()
    assert len(points) == 10
    assert {p["point"] for p in points} == {"prepare", "step", "data", "save"}
    steps = [p["step"] for p in points[1:]]
    assert steps == sorted(set(steps)) and steps[-1] < STEPS


def test_ten_kills_and_resumes_give_the_weights_of_an_uninterrupted_run(tmp_path, launcher):
    straight = write_hand_off_exports(tmp_path / "straight")
    code, output = launcher.run(stage_c_argv(straight, STEPS, EVERY), tmp_path / "straight.log")
    assert code == 0, output[-3000:]

    killed = write_hand_off_exports(tmp_path / "killed")
    run_dir = stage_c_dir(killed)
    events = tmp_path / "events.jsonl"
    losses = []
    for n, pause in enumerate(kill_points()):
        log = tmp_path / f"launch-{n}.log"
        resumable = find_resume_checkpoint(run_dir / "checkpoints")
        run = launcher.start(stage_c_argv(killed, STEPS, EVERY), log, faults={"events": str(events), "pause": pause})
        where = wait_for_event(run, events, n)
        run.kill()
        assert where["point"] == pause["point"] and where["pid"] == run.pid

        assert unreadable_checkpoints(run_dir) == [], f"after kill {n} at {where}"
        assert not (run_dir / "export" / "model.safetensors").exists()
        newest = find_resume_checkpoint(run_dir / "checkpoints")
        if where["step"] is not None:
            lost = where["step"] - (checkpoint_step(newest) if newest else 0)
            assert 0 <= lost <= EVERY, f"kill {n} at {where} lost {lost} steps (checkpoint every {EVERY})"
            losses.append((where["point"], where["step"], lost))
        if resumable is not None:
            assert f"resuming from {resumable}" in run.output(), f"launch {n} did not resume:\n{run.output()[-3000:]}"

    code, output = launcher.run(stage_c_argv(killed, STEPS, EVERY), tmp_path / "final.log")
    assert code == 0, output[-3000:]
    assert "resuming from" in output
    assert unreadable_checkpoints(run_dir) == []
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")) == [], \
        "temporary files of killed checkpoint writes were left behind"

    print("\nkill -9 -> steps lost (steps done since the last checkpoint):")
    for point, step, lost in losses:
        print(f"  {point:5s} at step {step:2d}: {lost}")
    print(f"  mean {sum(lost for *_, lost in losses) / len(losses):.2f}, max {max(lost for *_, lost in losses)}")

    expected = load_file(str(stage_c_dir(straight) / "export" / "model.safetensors"))
    resumed = load_file(str(run_dir / "export" / "model.safetensors"))
    assert expected.keys() == resumed.keys()
    different = [key for key in expected if not torch.equal(expected[key], resumed[key])]
    assert different == [], f"{len(different)} tensors differ from the uninterrupted run, e.g. {different[:3]}"
