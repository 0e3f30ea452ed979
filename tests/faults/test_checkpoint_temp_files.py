"""A checkpoint write killed mid-way leaves its temporary file (``.step-<N>.ckpt.tmp-<pid>``); the
next save removes those of writers that are gone, so preemptions do not pile up dead checkpoints
(tens of GB each at paper size), and never touches a live writer's."""

from __future__ import annotations

import subprocess
import sys

import torch

from wurst.train.checkpointing import AtomicCheckpointIO


def test_the_next_save_removes_temporary_files_of_killed_writes(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    stale = tmp_path / f".step-000000006.ckpt.tmp-{gone.pid}"
    stale.write_bytes(b"half a checkpoint")
    AtomicCheckpointIO().save_checkpoint({"w": torch.zeros(4)}, tmp_path / "step-000000003.ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000000003.ckpt"]


def test_a_live_writers_temporary_file_is_left_alone(tmp_path):
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = tmp_path / f".step-000000006.ckpt.tmp-{writer.pid}"
        live.write_bytes(b"being written")
        AtomicCheckpointIO().save_checkpoint({"w": torch.zeros(4)}, tmp_path / "step-000000003.ckpt")
        assert live.exists()
    finally:
        writer.kill()
        writer.wait()


def test_files_that_are_not_checkpoint_temporaries_are_left_alone(tmp_path):
    others = [tmp_path / ".hidden-notes.txt", tmp_path / ".model.safetensors.tmp-1", tmp_path / "step-1.ckpt.tmp-1"]
    for path in others:
        path.write_text("not ours")
    AtomicCheckpointIO().save_checkpoint({"w": torch.zeros(4)}, tmp_path / "step-000000003.ckpt")
    assert all(path.exists() for path in others)
