"""A corrupted newest checkpoint in a real run directory: ``resume=auto`` detects it (truncated zip,
or a CRC that no longer matches after flipped bytes), logs it, falls back to the previous valid
checkpoint, and the run completes. A corrupted checkpoint named explicitly (``resume=<path>``) is
refused rather than loaded: torch.load itself does not check CRCs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from wurst.train.checkpointing import AtomicCheckpointIO
from wurst.train.export import read_provenance

from .conftest import stage_c_argv, stage_c_dir, unreadable_checkpoints, write_hand_off_exports

EVERY = 3


def truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) * 2 // 3)


def flip_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2  # inside a stored tensor: that member's CRC-32 no longer matches
    for i in range(middle, middle + 16):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.slow
def test_a_truncated_then_a_byte_flipped_newest_checkpoint_is_skipped_and_the_run_completes(tmp_path, launcher):
    out = write_hand_off_exports(tmp_path)
    checkpoints = stage_c_dir(out) / "checkpoints"
    code, output = launcher.run(stage_c_argv(out, 2 * EVERY, EVERY), tmp_path / "first.log")
    assert code == 0, output[-3000:]

    for n, (corrupt, steps) in enumerate(((truncate, 3 * EVERY), (flip_bytes, 4 * EVERY))):
        newest = checkpoints / f"step-{steps - EVERY:09d}.ckpt"
        previous = checkpoints / f"step-{steps - 2 * EVERY:09d}.ckpt"
        corrupt(newest)
        assert unreadable_checkpoints(stage_c_dir(out)) != []
        code, output = launcher.run(stage_c_argv(out, steps, EVERY), tmp_path / f"resume-{n}.log")
        assert code == 0, output[-3000:]
        assert f"skipping checkpoint {newest}" in output and "falling back to an older one" in output, output[-3000:]
        assert f"resuming from {previous}" in output
        assert read_provenance(stage_c_dir(out) / "export")["steps"] == steps
        assert unreadable_checkpoints(stage_c_dir(out)) == []  # the corrupted one was rewritten by the rerun


def test_a_checkpoint_with_flipped_bytes_named_explicitly_is_refused_not_loaded_silently(tmp_path):
    path = tmp_path / "step-000000001.ckpt"
    weights = torch.arange(100_000, dtype=torch.float32)
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": weights}}, path)
    flip_bytes(path)
    silently = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]["w"]
    assert not torch.equal(silently, weights)  # what plain torch.load would resume from
    with pytest.raises(ValueError, match=r"is corrupted \(member .* fails its CRC check\)"):
        AtomicCheckpointIO().load_checkpoint(path)
