"""Fixtures for the SLURM tests: the loopback cluster, shared tiny data, and the real training jobs.

Tests that need the cluster skip with the reason when the SLURM/munge binaries are missing or we are
not root (``.ci/run`` installs slurm-wlm and munge). The jobs are real ``wurst-train`` runs with tiny
overrides. Each long job is submitted by a session fixture as soon as a quick test asks for it, and
the tests that wait for the jobs run last (``pytest_collection_modifyitems``), so the jobs' minutes
overlap on the two loopback nodes instead of adding up.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from wurst.slurm.cluster import LoopbackCluster, unavailable_reason
from wurst.slurm.submit import JobStatus, job_status, submit
from wurst.slurm.template import SlurmJob

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
PYTHON = sys.executable
VENV_BIN = Path(PYTHON).parent
OBSERVED_TRAIN = HERE / "payloads" / "observed_train.py"

# Session fixtures that submit a long job; a quick test using one runs first, so the job starts early.
BACKGROUND_JOBS = {"ddp_run", "requeue_run", "time_limited_run", "tiny_chain", "failed_chain", "tiny_sweep"}

# The two-node Stage C job of test_ddp and test_preemption (the requeued twin): finite shards split by
# rank; no DataLoader workers, because SLURM's SIGTERM reaches every process of the step and a torch
# worker dies of it (slurm/preemption.py, caveats).
DDP_STEPS = 12
DDP_OVERRIDES = [
    "trainer=ddp",
    "trainer.num_nodes=2",
    "trainer.devices=1",
    "trainer.accelerator=cpu",
    f"trainer.max_steps={DDP_STEPS}",
    "checkpoint_every=2",
    "data.mode=finite",
    "data.num_workers=0",
]
# experiment=tiny: Stage C's global batch; 8 per rank on two ranks.
TINY_C_GLOBAL_BATCH = 16


def pytest_collection_modifyitems(config, items):
    """Order within tests/slurm (other folders keep their places): first quick tests that submit a long
    job, then the other quick tests, then the slow ones (which wait for the jobs)."""
    positions = [i for i, item in enumerate(items) if Path(item.path).resolve().is_relative_to(HERE)]

    def rank(item) -> int:
        if item.get_closest_marker("slow") is not None:
            return 2
        return 0 if BACKGROUND_JOBS & set(getattr(item, "fixturenames", ())) else 1

    ours = sorted((items[i] for i in positions), key=rank)
    for i, item in zip(positions, ours):
        items[i] = item


@pytest.fixture(scope="session")
def cluster(tmp_path_factory) -> Iterator[LoopbackCluster]:
    """The two-node loopback cluster, with SLURM_CONF pointing at it for the whole session and the venv's
    bin first on PATH (jobs inherit the submitter's environment: they run its wurst-train and python)."""
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    loopback = LoopbackCluster(tmp_path_factory.mktemp("slurm-cluster"))
    saved = {key: os.environ.get(key) for key in ("SLURM_CONF", "PATH")}
    os.environ.update(loopback.up())
    os.environ["PATH"] = f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    try:
        yield loopback
    finally:
        loopback.down()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def wait_for_job(job_id: str, timeout_s: float, log: Path | None = None) -> JobStatus:
    """Polls until the job reaches a final state; fails the test (with the job's log) on timeout."""
    deadline = time.monotonic() + timeout_s
    status = job_status(job_id)
    while not status.finished:
        if time.monotonic() > deadline:
            tail = log.read_text()[-3000:] if log is not None and log.is_file() else ""
            pytest.fail(f"job {job_id} still {status.state} ({status.reason}) after {timeout_s:.0f}s\n{tail}")
        time.sleep(1)
        status = job_status(job_id)
    return status


@pytest.fixture(scope="session")
def wait_job() -> Callable[..., JobStatus]:
    return wait_for_job


def loopback_job(name: str, log: Path, **settings) -> SlurmJob:
    """A job for the loopback cluster: conf/slurm/loopback.yaml plus ``settings``."""
    base = yaml.safe_load((REPO / "conf" / "slurm" / "loopback.yaml").read_text())
    return SlurmJob.from_mapping(base, job_name=name, output=str(log), chdir=str(REPO), **settings)


@pytest.fixture(scope="session")
def make_job() -> Callable[..., SlurmJob]:
    return loopback_job


# -- tiny data and hand-off exports ----------------------------------------------------------------


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """``paths.data_dir`` shared by every job: 4 synthetic shards of 32 samples that all pass the LAION
    filter, so in finite mode each of two ranks gets 2 shards and the same number of batches."""
    from wurst.data.synthetic import write_synthetic_shards

    root = tmp_path_factory.mktemp("data")
    write_synthetic_shards(
        root / "synthetic", num_samples=128, num_shards=4, resolution=128, seed=0, fail_fractions={}
    )
    return root


def _train_tests_conftest() -> Any:
    spec = importlib.util.spec_from_file_location(
        "wurst_tests_train_conftest", REPO / "tests" / "train" / "conftest.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_hand_off(output_dir: Path) -> Path:
    """``output_dir`` with random tiny Stage A and Stage B exports in ``tiny/`` (what Stage C consumes)."""
    write_tiny_export = _train_tests_conftest().write_tiny_export
    write_tiny_export(output_dir / "tiny" / "stage_a" / "export", "a")
    write_tiny_export(output_dir / "tiny" / "stage_b" / "export", "b")
    return output_dir


def observed_stage_c(output_dir: Path, data_dir: Path, *overrides: str) -> list[str]:
    """argv of a tiny Stage C run under payloads/observed_train.py (wurst-train + RankRecorder)."""
    return [
        PYTHON,
        str(OBSERVED_TRAIN),
        "stage=c",
        "experiment=tiny",
        f"paths.output_dir={output_dir}",
        f"paths.data_dir={data_dir}",
        "logger=csv",
        *overrides,
    ]


def load_observed_train() -> Any:
    spec = importlib.util.spec_from_file_location("wurst_observed_train", OBSERVED_TRAIN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- submitted runs ---------------------------------------------------------------------------------


@dataclass
class SubmittedRun:
    """A Stage C job: its id, output root (``paths.output_dir``), run directory, log and sbatch script."""

    job_id: str
    output_dir: Path
    log: Path
    script: Path
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def run_dir(self) -> Path:
        return self.output_dir / "tiny" / "stage_c"

    def events(self, rank: int, kind: str | None = None) -> list[dict[str, Any]]:
        """RankRecorder's records of ``rank`` (optionally only ``start``, ``batch`` or ``end``)."""
        lines = (self.run_dir / "ranks" / f"rank{rank}.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines]
        return [r for r in records if kind is None or r["event"] == kind]

    def provenance(self) -> dict[str, Any]:
        return json.loads((self.run_dir / "export" / "provenance.json").read_text())

    def wait(self, timeout_s: float) -> JobStatus:
        return wait_for_job(self.job_id, timeout_s, self.log)


def submit_stage_c(root: Path, data_dir: Path, name: str, overrides: list[str], **settings) -> SubmittedRun:
    output_dir = tiny_hand_off(root / "outputs")
    log, script = root / "job.out", root / "job.sbatch"
    job = loopback_job(name, log, **settings)
    job_id = submit(job, observed_stage_c(output_dir, data_dir, *overrides), script)
    return SubmittedRun(job_id, output_dir, log, script)


@pytest.fixture(scope="session")
def ddp_run(cluster, data_dir, tmp_path_factory) -> SubmittedRun:
    """The two-node × one-task tiny Stage C job (Lightning DDP on CPU, gloo), uninterrupted."""
    return submit_stage_c(
        tmp_path_factory.mktemp("ddp"),
        data_dir,
        "wurst-test-ddp",
        DDP_OVERRIDES,
        nodes=2,
        tasks_per_node=1,
        time="15",
        signal_seconds=None,
    )


@pytest.fixture(scope="session")
def requeue_run(cluster, data_dir, tmp_path_factory) -> SubmittedRun:
    """The same job, requeued with ``scontrol requeue`` once its step-4 checkpoint exists.

    A thread does the requeue while other tests run; ``extra["requeuer"]`` is it, ``extra["requeued_at"]``
    the step the job had reached then (by the newest periodic checkpoint), or an error message.
    """
    run = submit_stage_c(
        tmp_path_factory.mktemp("requeue"),
        data_dir,
        "wurst-test-requeue",
        DDP_OVERRIDES,
        nodes=2,
        tasks_per_node=1,
        time="15",
        signal_seconds=None,
    )

    def requeue_mid_run() -> None:
        checkpoint = run.run_dir / "checkpoints" / "step-000000004.ckpt"
        deadline = time.monotonic() + 420
        while not checkpoint.exists():
            if time.monotonic() > deadline or job_status(run.job_id).finished:
                run.extra["requeued_at"] = (
                    f"no step-4 checkpoint appeared (job {job_status(run.job_id).state})"
                )
                return
            time.sleep(0.5)
        proc = subprocess.run(
            ["scontrol", "requeue", run.job_id], check=False, capture_output=True, text=True
        )
        run.extra["requeued_at"] = 4 if proc.returncode == 0 else f"scontrol requeue failed: {proc.stderr}"

    requeuer = threading.Thread(target=requeue_mid_run, name="requeue", daemon=True)
    requeuer.start()
    run.extra["requeuer"] = requeuer
    return run


# The time-limit job: slurmctld checks limits every 30 s and warns once at most signal_seconds + 30 s
# remain, i.e. here 90-120 s after the start (start-up under a loaded CPU is well within that). The first
# run's steps are slowed (RankRecorder's knob) so it is still training then; the requeued run is not.
TIME_LIMIT, SIGNAL_SECONDS, TIME_LIMIT_STEPS, FIRST_RUN_STEP_SLEEP_S = "3", 60, 24, 5


@pytest.fixture(scope="session")
def time_limited_run(cluster, data_dir, tmp_path_factory) -> SubmittedRun:
    """A one-task Stage C job that cannot finish within its 3-minute limit: it is warned with SIGUSR1,
    checkpoints, requeues itself and finishes in the requeued run. Default tiny data loader (1 worker)."""
    base = yaml.safe_load((REPO / "conf" / "slurm" / "loopback.yaml").read_text())
    env = {**base["env"], "WURST_TEST_FIRST_RUN_STEP_SLEEP_S": str(FIRST_RUN_STEP_SLEEP_S)}
    return submit_stage_c(
        tmp_path_factory.mktemp("time-limit"),
        data_dir,
        "wurst-test-timelimit",
        [f"trainer.max_steps={TIME_LIMIT_STEPS}", "checkpoint_every=8"],
        time=TIME_LIMIT,
        signal_seconds=SIGNAL_SECONDS,
        env=env,
    )


# -- the tiny pipeline as a chain, and a sweep ---------------------------------------------------------

# Appended to every training step of the chain (python -m wurst.slurm chain ... -- <these>).
CHAIN_STEPS = 4
CHAIN_OVERRIDES = ["logger=csv", f"trainer.max_steps={CHAIN_STEPS}", "checkpoint_every=2"]


@dataclass
class SubmittedChain:
    """A chain submitted with ``python -m wurst.slurm chain``: its record, where it trains, and what
    ``python -m wurst.slurm status`` said right after the submission."""

    chain_file: Path
    output_dir: Path
    env: dict[str, str]
    submitted: str
    status_at_submission: str

    @property
    def pipeline_dir(self) -> Path:
        return self.output_dir / "tiny"

    def record(self) -> dict[str, Any]:
        return json.loads(self.chain_file.read_text())


def slurm_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PYTHON, "-m", "wurst.slurm", *args],
        check=False,
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=timeout,
    )


def submit_chain_cli(root: Path, data_dir: Path, spec: Path) -> SubmittedChain:
    env = {**os.environ, "WURST_OUTPUT_DIR": str(root / "outputs"), "WURST_DATA_DIR": str(data_dir)}
    chain_file = root / "chain.json"
    proc = slurm_cli(
        "chain",
        str(spec),
        "--config",
        str(REPO / "conf" / "slurm" / "loopback.yaml"),
        "--chain-file",
        str(chain_file),
        "--",
        *CHAIN_OVERRIDES,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    status = slurm_cli("status", str(chain_file), env=env)
    return SubmittedChain(chain_file, root / "outputs", env, proc.stdout, status.stdout)


@pytest.fixture(scope="session")
def tiny_chain(cluster, data_dir, tmp_path_factory) -> SubmittedChain:
    """conf/slurm/chain/tiny.yaml (A → B → C → manifest) with tiny step counts, from the command line."""
    return submit_chain_cli(
        tmp_path_factory.mktemp("chain"), data_dir, REPO / "conf" / "slurm" / "chain" / "tiny.yaml"
    )


@pytest.fixture(scope="session")
def failed_chain(cluster, data_dir, tmp_path_factory) -> SubmittedChain:
    """The tiny chain without its Stage A job: Stage B fails its hand-off check (no Stage A export)."""
    root = tmp_path_factory.mktemp("failed-chain")
    spec = yaml.safe_load((REPO / "conf" / "slurm" / "chain" / "tiny.yaml").read_text())
    spec["steps"] = spec["steps"][1:]
    (root / "spec.yaml").write_text(yaml.safe_dump(spec))
    return submit_chain_cli(root, data_dir, root / "spec.yaml")


@dataclass
class RunningSweep:
    process: subprocess.Popen
    sweep_dir: Path
    output_dir: Path
    log: Path

    def wait(self, timeout_s: float) -> int:
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            pytest.fail(f"the sweep did not finish in {timeout_s:.0f}s:\n{self.log.read_text()[-3000:]}")


SWEEP_LRS = ("0.001", "0.003")


@pytest.fixture(scope="session")
def tiny_sweep(cluster, data_dir, tmp_path_factory) -> Iterator[RunningSweep]:
    """``wurst-train --multirun hydra/launcher=slurm_loopback`` over two learning rates (tiny Stage C)."""
    root = tmp_path_factory.mktemp("sweep")
    output_dir = tiny_hand_off(root / "outputs")
    sweep_dir, log = root / "sweep", root / "multirun.log"
    argv = [
        str(VENV_BIN / "wurst-train"),
        "--multirun",
        "hydra/launcher=slurm_loopback",
        "stage=c",
        "experiment=tiny",
        f"optim.lr={','.join(SWEEP_LRS)}",
        f"paths.output_dir={output_dir}",
        f"paths.data_dir={data_dir}",
        "logger=csv",
        "trainer.max_steps=4",
        "checkpoint_every=2",
        f"hydra.sweep.dir={sweep_dir}",
    ]
    with open(log, "w") as handle:
        process = subprocess.Popen(
            argv, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT, env=os.environ.copy()
        )
    sweep = RunningSweep(process, sweep_dir, output_dir, log)
    yield sweep
    if process.poll() is None:
        process.kill()
        process.wait()
