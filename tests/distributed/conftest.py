"""Fixtures for the multi-process tests: real ``torchrun`` launches of real ``wurst-train`` stage runs
(Lightning DDP on CPU, gloo, 2 processes) under payloads/rank_state_train.py, which has every rank
write the state it ended with.

The runs use each stage's default tiny recipe (``experiment=tiny``); the only overrides are the
process layout, the step count, the checkpoint interval, CSV logging and ``data.num_workers=0`` (the
processes share two cores). Each run is made once per session, by the first test that asks for it.
tests/slurm/test_ddp_stages.py runs the same payload on the loopback SLURM cluster (2 nodes).
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
PYTHON = sys.executable
TORCHRUN = Path(PYTHON).parent / "torchrun"
PAYLOAD = HERE / "payloads" / "rank_state_train.py"
WORLD = 2
RUN_TIMEOUT_S = 480

# Steps per stage. Stage A: the discriminator joins at batch 2 (tiny: 170), so both phases run; Lightning
# counts each optimiser's step, so 6 steps are 4 batches (2 without, 2 with the discriminator).
# Stage B: 8 steps with seed 0 include a batch whose compressor latents are zeroed on one rank only
# (the draw that used to break DDP; the test checks it happened).
STEPS = {"a": 6, "b": 8, "c": 4}
CHECKPOINT_EVERY = 2
STAGE_EXTRA = {"a": ["stage.module.disc_start=2", "trainer.log_every_n_steps=1"], "b": [], "c": []}


def _train_tests_conftest() -> Any:
    spec = importlib.util.spec_from_file_location(
        "wurst_tests_train_conftest", REPO / "tests" / "train" / "conftest.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# The exports a stage reads: random tiny ones, made on the spot.
HAND_OFF = {"a": (), "b": ("a",), "c": ("a", "b")}


def hand_off(output_dir: Path, stage: str) -> Path:
    """``output_dir`` with the random tiny exports ``stage`` consumes in ``tiny/`` (B: Stage A's; C: A's and B's)."""
    write_tiny_export = _train_tests_conftest().write_tiny_export
    for earlier in HAND_OFF[stage]:
        write_tiny_export(output_dir / "tiny" / f"stage_{earlier}" / "export", earlier)
    output_dir.mkdir(parents=True, exist_ok=True)
    return output_dir


def stage_overrides(stage: str, output_dir: Path, data_dir: Path, steps: int | None = None) -> list[str]:
    """The Hydra overrides of a tiny ``stage`` run (process layout excluded)."""
    return [
        f"stage={stage}",
        "experiment=tiny",
        f"paths.output_dir={output_dir}",
        f"paths.data_dir={data_dir}",
        "logger=csv",
        "callbacks.progress_bar=false",
        "data.num_workers=0",
        f"trainer.max_steps={STEPS[stage] if steps is None else steps}",
        f"checkpoint_every={CHECKPOINT_EVERY}",
        *STAGE_EXTRA[stage],
    ]


def torchrun_argv(overrides: list[str]) -> list[str]:
    return [
        str(TORCHRUN),
        "--standalone",
        f"--nproc_per_node={WORLD}",
        str(PAYLOAD),
        "trainer=ddp",
        "trainer.accelerator=cpu",
        f"trainer.devices={WORLD}",
        *overrides,
    ]


def run_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def launch(argv: list[str], log: Path) -> subprocess.Popen:
    """Starts ``argv`` in its own session with output to ``log``."""
    with open(log, "w") as handle:
        return subprocess.Popen(
            argv, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT, env=run_env(), start_new_session=True
        )


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (Linux /proc)."""
    found = [pid]
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for child in children:
            found += process_tree(int(child))
    return found


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL to the launcher and every process below it, as a node failure would. torchrun starts each
    worker in a session of its own, so killing torchrun's process group alone leaves them running."""
    groups = set()
    for pid in process_tree(proc.pid):
        try:
            groups.add(os.getpgid(pid))
        except ProcessLookupError:
            pass
    for group in groups:
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def finish(proc: subprocess.Popen, log: Path, timeout_s: float = RUN_TIMEOUT_S) -> str:
    """Waits for a launch; fails the test with the log's tail when it fails or takes too long."""
    try:
        code = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        pytest.fail(f"{log.name}: still running after {timeout_s:.0f} s\n{log.read_text()[-3000:]}")
    output = log.read_text(errors="replace")
    assert code == 0, f"{log.name}: exit {code}\n{output[-4000:]}"
    return output


@dataclass
class RankStates:
    """What payloads/rank_state_train.py wrote for each rank of a finished run."""

    run_dir: Path
    world: int = WORLD

    @property
    def folder(self) -> Path:
        return self.run_dir / "rank_state"

    def state(self, rank: int) -> dict[str, torch.Tensor]:
        return load_file(str(self.folder / f"rank{rank}.safetensors"))

    def record(self, rank: int) -> dict[str, Any]:
        return json.loads((self.folder / f"rank{rank}.json").read_text())

    def lines(self, rank: int, kind: str) -> list[dict[str, Any]]:
        path = self.folder / f"rank{rank}.{kind}.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []

    def export(self, name: str = "model") -> dict[str, torch.Tensor]:
        return load_file(str(self.run_dir / "export" / f"{name}.safetensors"))


def max_abs_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, list[str]]:
    """max |a − b| over every tensor of two state dicts with the same keys, and the keys that differ."""
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))[:5]
    worst, different = 0.0, []
    for key in sorted(a):
        if not torch.equal(a[key], b[key]):
            different.append(key)
            if a[key].numel():
                worst = max(worst, (a[key].double() - b[key].double()).abs().max().item())
    return worst, different


def compose(overrides: list[str]):
    """The composed ``wurst-train`` config for ``overrides``."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from wurst.train.config import CONFIG_DIR

    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        return hydra_compose(config_name="train", overrides=overrides)


def with_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """``paths.data_dir`` of every run: 4 synthetic shards of 16 samples that all pass the LAION filter."""
    from wurst.data.synthetic import write_synthetic_shards

    root = tmp_path_factory.mktemp("data")
    write_synthetic_shards(
        root / "synthetic", num_samples=64, num_shards=4, resolution=128, seed=0, fail_fractions={}
    )
    return root


@dataclass
class FinishedRun:
    output_dir: Path
    stage: str
    output: str
    seconds: float

    @property
    def run_dir(self) -> Path:
        return self.output_dir / "tiny" / f"stage_{self.stage}"

    @property
    def ranks(self) -> RankStates:
        return RankStates(self.run_dir)


def run_stage_ddp(stage: str, root: Path, data_dir: Path) -> FinishedRun:
    output_dir = hand_off(root / "outputs", stage)
    log = root / f"stage_{stage}.log"
    start = time.monotonic()
    output = finish(launch(torchrun_argv(stage_overrides(stage, output_dir, data_dir)), log), log)
    return FinishedRun(output_dir, stage, output, time.monotonic() - start)


@pytest.fixture(scope="session")
def ddp_stage_a(tmp_path_factory, data_dir) -> FinishedRun:
    return run_stage_ddp("a", tmp_path_factory.mktemp("ddp-a"), data_dir)


@pytest.fixture(scope="session")
def ddp_stage_b(tmp_path_factory, data_dir) -> FinishedRun:
    """The uninterrupted 2-process Stage B run (also the reference of the kill -9 test)."""
    return run_stage_ddp("b", tmp_path_factory.mktemp("ddp-b"), data_dir)


@pytest.fixture(scope="session")
def ddp_stage_c(tmp_path_factory, data_dir) -> FinishedRun:
    return run_stage_ddp("c", tmp_path_factory.mktemp("ddp-c"), data_dir)
