"""Crash-safe checkpoints: atomic writes, validity checks and resume=auto's fallback."""

import os
import pickle
import time

import pytest
import torch

from wurst.train.checkpointing import AtomicCheckpointIO, find_resume_checkpoint, is_valid_checkpoint


def _save(io, path, value):
    io.save_checkpoint({"state_dict": {"w": torch.full((64,), float(value))}, "global_step": value}, path)


def test_atomic_save_leaves_no_temporary_file_and_loads_back(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "step-1.ckpt"
    _save(io, path, 1)
    assert is_valid_checkpoint(path)[0]
    assert io.load_checkpoint(path)["global_step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["step-1.ckpt"]


def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    _save(io, path, 1)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full (simulated inside torch.save)")

    try:
        io.save_checkpoint({"bad": Unpicklable()}, path)
    except RuntimeError:
        pass
    assert io.load_checkpoint(path)["global_step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_resume_auto_skips_a_truncated_newest_checkpoint(tmp_path):
    io = AtomicCheckpointIO()
    old, new = tmp_path / "step-000000001.ckpt", tmp_path / "step-000000002.ckpt"
    _save(io, old, 1)
    time.sleep(0.01)
    _save(io, new, 2)
    assert find_resume_checkpoint(tmp_path) == new
    with open(new, "r+b") as f:
        f.truncate(os.path.getsize(new) // 2)
    assert not is_valid_checkpoint(new)[0]
    assert find_resume_checkpoint(tmp_path) == old


def test_resume_auto_skips_a_checkpoint_with_flipped_bytes(tmp_path):
    io = AtomicCheckpointIO()
    old, new = tmp_path / "step-000000001.ckpt", tmp_path / "step-000000002.ckpt"
    _save(io, old, 1)
    time.sleep(0.01)
    _save(io, new, 2)
    data = bytearray(new.read_bytes())
    middle = len(data) // 2  # inside a stored member: its CRC no longer matches
    for i in range(middle, middle + 64):
        data[i] ^= 0xFF
    new.write_bytes(bytes(data))
    assert not is_valid_checkpoint(new)[0]
    assert find_resume_checkpoint(tmp_path) == old


def test_checkpoints_refuse_pickled_code(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"payload": os.system}, path)
    with pytest.raises(pickle.UnpicklingError, match="weights_only"):
        AtomicCheckpointIO().load_checkpoint(path)
