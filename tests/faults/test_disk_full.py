"""Disk full while saving a checkpoint: the run stops with an error that names ENOSPC, the checkpoint
it was writing and the intact previous one; that previous checkpoint stays loadable and no temporary
file is left. Once with the checkpoint folder on a real 24 MiB tmpfs (where this machine lets us
mount one), once with the failing write injected at the file layer (everywhere)."""

from __future__ import annotations

import errno
import subprocess
from pathlib import Path

import pytest
import torch

from train.checkpointing import AtomicCheckpointIO

from .conftest import stage_c_argv, stage_c_dir, write_hand_off_exports
from .fault_points import full_disk_open

EVERY = 3
FREE_BYTES = 24 * 2**20  # a tiny Stage C checkpoint is ~16 MB: the first fits, the second does not


@pytest.fixture
def small_disk(tmp_path):
    """A 24 MiB tmpfs at ``tmp_path/small``; skips where mounting is not permitted."""
    mountpoint = tmp_path / "small"
    mountpoint.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={FREE_BYTES}", "tmpfs", str(mountpoint)],
                             capture_output=True, text=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}); the injected-ENOSPC test covers this")
    yield mountpoint
    subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def assert_stopped_on_a_full_disk(code: int, output: str, checkpoints: Path) -> None:
    assert code != 0, "the run went on although its checkpoint could not be written"
    failed = checkpoints / f"step-{2 * EVERY:09d}.ckpt"
    assert f"could not save checkpoint {failed}: No space left on device (ENOSPC)" in output, output[-3000:]
    assert f"the previous checkpoints are intact (step-{EVERY:09d}.ckpt)" in output
    assert sorted(p.name for p in checkpoints.iterdir()) == [f"step-{EVERY:09d}.ckpt"]
    assert torch.load(checkpoints / f"step-{EVERY:09d}.ckpt", map_location="cpu", weights_only=True)["global_step"] == EVERY
    assert not (checkpoints.parent / "export").exists()


@pytest.mark.slow
def test_a_full_tmpfs_stops_the_run_with_enospc_and_keeps_the_previous_checkpoint(tmp_path, small_disk, launcher):
    out = write_hand_off_exports(tmp_path / "out")
    checkpoints = stage_c_dir(out) / "checkpoints"
    checkpoints.parent.mkdir(parents=True)
    checkpoints.symlink_to(small_disk, target_is_directory=True)
    code, output = launcher.run(stage_c_argv(out, 3 * EVERY, EVERY), tmp_path / "run.log")
    assert_stopped_on_a_full_disk(code, output, checkpoints)


@pytest.mark.slow
def test_an_injected_enospc_stops_the_run_and_keeps_the_previous_checkpoint(tmp_path, launcher):
    out = write_hand_off_exports(tmp_path / "out")
    code, output = launcher.run(
        stage_c_argv(out, 3 * EVERY, EVERY), tmp_path / "run.log",
        faults={"disk_full": {"free_bytes": FREE_BYTES}},
    )
    assert_stopped_on_a_full_disk(code, output, stage_c_dir(out) / "checkpoints")


def test_a_failed_write_raises_oserror_with_its_errno_not_torchs_zip_writer_error(tmp_path, monkeypatch):
    import train.checkpointing

    monkeypatch.setattr(train.checkpointing, "open", full_disk_open(1000), raising=False)
    with pytest.raises(OSError) as raised:
        AtomicCheckpointIO().save_checkpoint({"w": torch.zeros(10_000)}, tmp_path / "step-000000001.ckpt")
    assert raised.value.errno == errno.ENOSPC
    assert "ENOSPC" in str(raised.value) and "no earlier checkpoint exists" in str(raised.value)
    assert list(tmp_path.glob("*.ckpt*")) == [] and list(tmp_path.glob(".*")) == []
