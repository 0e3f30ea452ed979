"""Fixtures for the accounting tests: real tiny fits in their own processes, fabricated run directories."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from wurst.train.accounting.ledger import Ledger

REPO = Path(__file__).resolve().parents[2]
TINY_FIT = Path(__file__).with_name("tiny_fit.py")
SLEEP_S = 0.05  # per training step, so a fit loop lasts at least steps × SLEEP_S
# The killed run sleeps much longer per step than its resumption, so a ledger that restarted at the
# resume (instead of continuing) falls clearly short of the checkpoint's hours plus the new segment's.
KILLED_SLEEP_S, RESUMED_SLEEP_S = 0.25, 0.02


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    # Keep the launcher's SLURM detection out of it when the tests run inside a SLURM job.
    for key in [k for k in env if k.startswith("SLURM_")]:
        del env[key]
    return env


def tiny_fit(root: Path, *args: str, sleep: float = SLEEP_S, timeout: float = 240) -> subprocess.CompletedProcess:
    """Runs tests/accounting/tiny_fit.py to completion; fails the test with its output if it fails."""
    command = [sys.executable, str(TINY_FIT), "--root", str(root), "--sleep", str(sleep), *args]
    done = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=timeout, check=False)
    assert done.returncode == 0, f"tiny fit failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@dataclass
class FitRun:
    """A finished tiny fit: its directory, each rank's wall time around trainer.fit, and the final ledger."""

    root: Path
    fit_wall_s: list[float]
    ledgers: list[Ledger]  # as each rank finalized it

    @property
    def ledger(self) -> Ledger:
        return self.ledgers[0]


def finished(root: Path, world_size: int = 1) -> FitRun:
    results = [json.loads((root / f"fit_rank{r}.json").read_text()) for r in range(world_size)]
    return FitRun(root, [r["fit_wall_s"] for r in results], [Ledger.from_dict(r["ledger"]) for r in results])


@pytest.fixture(scope="session")
def ddp_run(tmp_path_factory) -> FitRun:
    """A finished two-process DDP fit (CPU, gloo), 8 steps of 4 samples per rank."""
    root = tmp_path_factory.mktemp("ddp")
    tiny_fit(root, "--devices", "2", "--max-steps", "8")
    return finished(root, world_size=2)


@pytest.fixture(scope="session")
def killed_and_resumed(tmp_path_factory) -> FitRun:
    """A fit SIGKILLed after its step-4 checkpoint, then resumed from it to step 12."""
    root = tmp_path_factory.mktemp("kill")
    command = [sys.executable, str(TINY_FIT), "--root", str(root), "--sleep", str(KILLED_SLEEP_S),
               "--max-steps", "12", "--ckpt-every", "4", "--hang-at-step", "4"]
    victim = subprocess.Popen(command, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while not (root / "hanging").exists():
            assert victim.poll() is None, f"the run to be killed exited early:\n{victim.stderr.read()[-3000:]}"
            assert time.monotonic() < deadline, "the run to be killed never reached its step-4 checkpoint"
            time.sleep(0.2)
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(timeout=30)
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.wait()
    assert victim.returncode == -signal.SIGKILL
    assert not (root / "fit_rank0.json").exists()  # it never finished
    (root / "killed_checkpoint.ckpt").write_bytes((root / "checkpoints" / "step=4.ckpt").read_bytes())
    resume = str(root / "checkpoints" / "step=4.ckpt")
    tiny_fit(root, "--max-steps", "12", "--ckpt-every", "4", "--resume", resume, sleep=RESUMED_SLEEP_S)
    return finished(root)


def _write_stage_run(
    run_dir: Path, ledger: Ledger, params: int | None = None, weights: dict[str, list[int]] | None = None
) -> Path:
    export = run_dir / "export"
    export.mkdir(parents=True)
    provenance = {"git_rev": "0" * 40, "config": {}, "steps": ledger.steps, "accounting": ledger.to_dict()}
    if params is not None:
        provenance["params"] = params
    (export / "provenance.json").write_text(json.dumps(provenance))
    if weights is not None:
        save_file({k: torch.zeros(shape) for k, shape in weights.items()}, str(export / "model.safetensors"))
    return run_dir


@pytest.fixture
def write_stage_run():
    """``write_stage_run(run_dir, ledger, params=None, weights=None)``: a fabricated stage run directory
    with export/provenance.json ("accounting", and "params" if given) and, for ``weights`` (name → shape),
    an export/model.safetensors of zeros."""
    return _write_stage_run


@pytest.fixture(scope="session")
def step_sleep_s() -> dict[str, float]:
    """Seconds each training step sleeps: in the DDP run, the killed run and its resumption."""
    return {"ddp": SLEEP_S, "killed": KILLED_SLEEP_S, "resumed": RESUMED_SLEEP_S}
