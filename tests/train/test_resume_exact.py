"""Resume is exact on CPU: N steps, a real SIGKILL, ``resume=auto``, N more steps gives the same
Stage C weights as 2N uninterrupted steps (per-step seeding + the data stream position in the
checkpoint + optimiser, scheduler and EMA state)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from .conftest import REPO, write_tiny_export

pytestmark = pytest.mark.slow

STEPS, EVERY = 8, 4


def stage_c_command(output_dir: Path) -> list[str]:
    return [
        sys.executable, "-m", "wurst.train", "stage=c", "experiment=tiny", f"paths.output_dir={output_dir}",
        f"trainer.max_steps={STEPS}", f"checkpoint_every={EVERY}", "logger=csv", "data.num_workers=1",
        "data.synthesize.num_samples=64", "data.synthesize.num_shards=4", "ema.start=2", "ema.every=2",
    ]


def prepared(root: Path) -> Path:
    write_tiny_export(root / "tiny" / "stage_a" / "export", "a")
    write_tiny_export(root / "tiny" / "stage_b" / "export", "b")
    return root


def test_kill_and_resume_gives_the_weights_of_an_uninterrupted_run(tmp_path):
    straight = prepared(tmp_path / "straight")
    subprocess.run(stage_c_command(straight), cwd=REPO, check=True, capture_output=True, timeout=600)

    killed = prepared(tmp_path / "killed")
    ckpt = killed / "tiny" / "stage_c" / "checkpoints" / f"step-{EVERY:09d}.ckpt"
    proc = subprocess.Popen(stage_c_command(killed), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (killed / "tiny" / "stage_c" / "export" / "model.safetensors").exists()

    resumed = subprocess.run(
        stage_c_command(killed), cwd=REPO, capture_output=True, text=True, timeout=600, check=False
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr + resumed.stdout

    a = load_file(str(straight / "tiny" / "stage_c" / "export" / "model.safetensors"))
    b = load_file(str(killed / "tiny" / "stage_c" / "export" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
