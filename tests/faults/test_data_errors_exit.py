"""A data error ends the whole run: the training process and its DataLoader workers, within seconds.

Workers survive SLURM's SIGTERM (slurm/preemption.py), so they used to survive their own training
process's SIGTERM too: after a data error the process printed the error and then waited at exit for
workers that ignored it, forever (on SLURM: until the time limit). These are real ``wurst-train``
processes with ``data.num_workers=2`` on real tar shards, each in its own session so that every
process it started can be found afterwards.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

WURST_TRAIN = [sys.executable, "-m", "wurst.train"]
STARTUP_LIMIT_S = 240  # imports + Trainer on a loaded 2-core machine; only bounds a hang
EXIT_LIMIT_S = 20  # from the error on the terminal to the last process of the run gone


def session_processes(sid: int) -> list[tuple[int, str]]:
    """(pid, command) of every live, non-zombie process in session ``sid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state ppid pgrp session ...
        if int(fields[3]) == sid and fields[0] != "Z":
            found.append((int(entry.name), cmd))
    return found


def run_until_gone(argv: list[str], log: Path, error_text: str) -> tuple[int, float, list]:
    """Runs ``wurst-train argv``; returns (exit code, seconds from ``error_text`` in its output to the
    whole session gone, processes left). Fails if the run has not errored and exited in time."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}
    with open(log, "wb") as out:
        proc = subprocess.Popen([*WURST_TRAIN, *argv], stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    try:
        errored_at = None
        deadline = time.monotonic() + STARTUP_LIMIT_S
        while proc.poll() is None or session_processes(proc.pid):
            now = time.monotonic()
            if errored_at is None and error_text in log.read_text(errors="replace"):
                errored_at = now
                deadline = now + EXIT_LIMIT_S
            if now > deadline:
                left = session_processes(proc.pid)
                pytest.fail(f"still running {now - (errored_at or now):.0f} s after the error "
                            f"(errored: {errored_at is not None}); processes: {left}\n"
                            f"{log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.2)
        gone_at = time.monotonic()
        if errored_at is None:
            errored_at = gone_at if error_text in log.read_text(errors="replace") else float("nan")
        return proc.returncode, gone_at - errored_at, session_processes(proc.pid)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def stage_a_argv(tmp_path: Path, shards: Path | str, *extra: str) -> list[str]:
    return ["stage=a", "experiment=tiny", "logger=csv", "callbacks.progress_bar=false", "data.num_workers=2",
            f"data.shards={shards}", "data.synthesize=null", f"paths.output_dir={tmp_path / 'out'}",
            "trainer.max_steps=4", *extra]


@pytest.fixture(scope="module")
def real_shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    subprocess.run([str(Path(sys.executable).with_name("wurst-data")), "synth", "--out", str(out), "--samples", "48",
                    "--shards", "4", "--resolution", "128"], check=True, capture_output=True)
    return out


@pytest.mark.slow
def test_a_text_file_named_as_a_tar_ends_the_run_and_its_workers_within_seconds(tmp_path):
    fake = tmp_path / "x.tar"
    fake.write_text("this is a text file, not a tar\n" * 20)
    code, seconds, left = run_until_gone(stage_a_argv(tmp_path, fake), tmp_path / "log.txt",
                                         "gave no readable sample")
    assert code != 0, (tmp_path / "log.txt").read_text()[-2000:]
    assert left == []
    assert seconds < EXIT_LIMIT_S


@pytest.mark.slow
def test_a_filter_that_rejects_everything_ends_the_run_and_its_workers_within_seconds(tmp_path, real_shards):
    argv = stage_a_argv(tmp_path, real_shards, "data.filter.min_aesthetic=100", "data.reject_all_check=20")
    code, seconds, left = run_until_gone(argv, tmp_path / "log.txt", "rejected all of the first 20 samples")
    assert code != 0, (tmp_path / "log.txt").read_text()[-2000:]
    assert left == []
    assert seconds < EXIT_LIMIT_S
