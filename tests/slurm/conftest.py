"""Fixtures for the SLURM tests: the loopback cluster (started once), job waiting, stand-in payloads.

Tests that need the cluster skip with the reason when the SLURM/munge binaries are missing or we are
not root (``.ci/run`` installs slurm-wlm and munge). The long preemption job is submitted by a
session fixture as soon as a fast test asks for it, and the slow tests of this folder run last, so
its minutes of mostly sleeping overlap with the rest of the suite.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from slurm.cluster import LoopbackCluster, unavailable_reason
from slurm.submit import JobStatus, job_status, submit
from slurm.template import SlurmJob

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
PAYLOADS = HERE / "payloads"
PYTHON = sys.executable


def pytest_collection_modifyitems(config, items):
    """Order within tests/slurm (other folders keep their places): first what submits the long
    time-limit job, so it runs in the background meanwhile; then fast tests; slow ones last."""
    positions = [i for i, item in enumerate(items) if Path(item.path).resolve().is_relative_to(HERE)]

    def rank(item) -> int:
        if item.get_closest_marker("slow") is not None:
            return 2
        return 0 if "time_limited_run" in getattr(item, "fixturenames", ()) else 1

    ours = sorted((items[i] for i in positions), key=rank)
    for i, item in zip(positions, ours):
        items[i] = item


@pytest.fixture(scope="session")
def cluster(tmp_path_factory) -> Iterator[LoopbackCluster]:
    """The two-node loopback cluster, with SLURM_CONF pointing at it for the whole session."""
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    loopback = LoopbackCluster(tmp_path_factory.mktemp("slurm-cluster"))
    previous = os.environ.get("SLURM_CONF")
    os.environ.update(loopback.up())
    try:
        yield loopback
    finally:
        loopback.down()
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous


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
    import yaml

    base = yaml.safe_load((REPO / "conf" / "slurm" / "loopback.yaml").read_text())
    return SlurmJob.from_mapping(base, job_name=name, output=str(log), **settings)


@pytest.fixture(scope="session")
def make_job() -> Callable[..., SlurmJob]:
    return loopback_job


def lightning_command(run_dir: Path, **options) -> list[str]:
    """argv of the Lightning stand-in job (tests/slurm/payloads/lightning_job.py)."""
    argv = [PYTHON, str(PAYLOADS / "lightning_job.py"), "--run-dir", str(run_dir)]
    for key, value in options.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    return argv


@pytest.fixture(scope="session")
def lightning_job_command() -> Callable[..., list[str]]:
    return lightning_command


@dataclass(frozen=True)
class SubmittedRun:
    job_id: str
    run_dir: Path
    log: Path
    script: Path


@pytest.fixture(scope="session")
def time_limited_run(cluster, tmp_path_factory) -> SubmittedRun:
    """A Lightning job that cannot finish in one allocation: 200 one-second steps under a 3-minute limit
    with ``--signal=USR1@90``. slurmctld warns it 60-90 s after start (when <= 90 + 30 s remain), i.e.
    after Lightning's handlers are up; the requeued run steps fast (0.05 s) and finishes in one go."""
    root = tmp_path_factory.mktemp("time-limit")
    run_dir, log, script = root / "run", root / "job.out", root / "job.sbatch"
    job = loopback_job("wurst-test-timelimit", log, time="3", signal_seconds=90)
    command = lightning_command(
        run_dir, max_steps=200, step_seconds=1.0, step_seconds_after_restart=0.05, ckpt_every=10
    )
    return SubmittedRun(submit(job, command, script), run_dir, log, script)
