"""Disk full while saving a checkpoint: the run stops with an error that names ENOSPC, the checkpoint
it was writing and the intact previous one; that previous checkpoint stays loadable and no temporary
file is left. Once with the checkpoint folder on a real 24 MiB tmpfs (where this machine lets us
mount one), once with the failing write injected at the file layer (everywhere)."""

from __future__ import annotations

import errno
import json
import subprocess
from pathlib import Path

import pytest
import torch

from wurst.train.checkpointing import AtomicCheckpointIO

from .conftest import stage_c_argv, stage_c_dir, write_hand_off_exports
from .fault_points import full_disk_open

EVERY = 3
FREE_BYTES = 24 * 2**20  # a tiny Stage C checkpoint is ~16 MB: the first fits, the second does not


@pytest.fixture
def tmpfs(tmp_path):
    """``tmpfs(name, size)`` mounts a tmpfs of ``size`` bytes at ``tmp_path/name``; skips where mounting
    is not permitted (the injected-ENOSPC test covers checkpoints there)."""
    mounted = []

    def mount(name: str, size: int) -> Path:
        mountpoint = tmp_path / name
        mountpoint.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mountpoint)],
                              capture_output=True, text=True, check=False)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(mountpoint)
        return mountpoint

    yield mount
    for mountpoint in mounted:
        subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True, check=False)


def assert_stopped_on_a_full_disk(code: int, output: str, checkpoints: Path) -> None:
    assert code != 0, "the run went on although its checkpoint could not be written"
    failed = checkpoints / f"step-{2 * EVERY:09d}.ckpt"
    assert f"could not save checkpoint {failed}: No space left on device (ENOSPC)" in output, output[-3000:]
    assert f"the previous checkpoints are intact (step-{EVERY:09d}.ckpt)" in output
    assert sorted(p.name for p in checkpoints.iterdir()) == [f"step-{EVERY:09d}.ckpt"]
    assert torch.load(checkpoints / f"step-{EVERY:09d}.ckpt", map_location="cpu", weights_only=True)["global_step"] == EVERY
    assert not (checkpoints.parent / "export").exists()


@pytest.mark.slow
def test_a_full_tmpfs_stops_the_run_with_enospc_and_keeps_the_previous_checkpoint(tmp_path, tmpfs, launcher):
    out = write_hand_off_exports(tmp_path / "out")
    checkpoints = stage_c_dir(out) / "checkpoints"
    checkpoints.parent.mkdir(parents=True)
    checkpoints.symlink_to(tmpfs("small", FREE_BYTES), target_is_directory=True)
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
    import wurst.train.checkpointing

    monkeypatch.setattr(wurst.train.checkpointing, "open", full_disk_open(1000), raising=False)
    with pytest.raises(OSError) as raised:
        AtomicCheckpointIO().save_checkpoint({"w": torch.zeros(10_000)}, tmp_path / "step-000000001.ckpt")
    assert raised.value.errno == errno.ENOSPC
    assert "ENOSPC" in str(raised.value) and "no earlier checkpoint exists" in str(raised.value)
    assert list(tmp_path.glob("*.ckpt*")) == [] and list(tmp_path.glob(".*")) == []


@pytest.mark.slow
def test_a_full_disk_at_export_leaves_no_complete_looking_export_and_a_rerun_only_exports(tmp_path, tmpfs, launcher):
    out = write_hand_off_exports(tmp_path / "out")
    export = stage_c_dir(out) / "export"
    export.parent.mkdir(parents=True)
    small = tmpfs("small", 4 * 2**20)  # the Stage C weights fit; the 13 MB tiny text encoder does not
    export.symlink_to(small, target_is_directory=True)
    code, output = launcher.run(stage_c_argv(out, 2 * EVERY, EVERY), tmp_path / "run.log")
    assert code != 0
    assert "No space left on device" in output, output[-3000:]
    assert not (export / "provenance.json").exists()  # written last: no consumer takes this for an export
    assert not (export / "text_encoder.safetensors").exists()

    subprocess.run(["umount", "-l", str(small)], check=True)  # space freed
    code, output = launcher.run(stage_c_argv(out, 2 * EVERY, EVERY), tmp_path / "rerun.log")
    assert code == 0, output[-3000:]
    assert f"resuming from {stage_c_dir(out) / 'checkpoints' / f'step-{2 * EVERY:09d}.ckpt'}" in output
    assert json.loads((export / "provenance.json").read_text())["steps"] == 2 * EVERY
