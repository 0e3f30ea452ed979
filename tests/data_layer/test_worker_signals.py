"""DataLoader workers and SIGTERM: SLURM's is survived, the training process's own is obeyed.

SLURM signals every process of a job before a requeue; the training process must be able to finish
its step and checkpoint, so its workers have to outlive that signal. The training process stopping
its workers (DataLoader shutdown, multiprocessing's exit handler) also uses SIGTERM, and that one
must end them, or the process waits for them forever at exit.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from wurst.data.laion_filter import LAIONFilter
from wurst.data.shard_stream import ImageShardStream
from wurst.data.stream_loader import StreamLoader


def children(pid: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            if int(fields[1]) == pid and fields[0] != "Z":
                found.add(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return state[state.rindex(")") + 2] != "Z"


@pytest.fixture
def running_workers(clean_shards):
    """A resampled two-worker stream that has delivered a batch: (batch iterator, worker pids)."""
    folder, _ = clean_shards
    stream = ImageShardStream(str(folder), batch_size=4, mode="resampled", resolution=16, laion_filter=LAIONFilter())
    before = children(os.getpid())
    batches = iter(StreamLoader(stream, num_workers=2))
    next(batches)
    workers = children(os.getpid()) - before
    assert len(workers) == 2
    yield batches, workers
    batches.close()


def test_a_worker_survives_a_sigterm_from_anyone_but_its_parent(running_workers):
    batches, workers = running_workers
    for pid in workers:  # sent by `kill`, as slurmstepd sends it to every process of the job step
        subprocess.run(["kill", "-TERM", str(pid)], check=True)
    time.sleep(1.5)
    assert all(alive(pid) for pid in workers)
    assert next(batches)["images"].shape[0] == 4


def test_a_worker_stops_at_once_on_its_parents_sigterm(running_workers):
    _, workers = running_workers
    for pid in workers:  # what DataLoader shutdown and multiprocessing's exit handler send
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 3
    while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(pid) for pid in workers)
