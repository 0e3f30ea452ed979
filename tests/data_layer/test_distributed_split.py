"""Two DDP ranks x two DataLoader workers in finite mode: every sample key seen exactly once."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from .conftest import READER_SCRIPT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_ranks_times_two_workers_read_every_key_exactly_once(clean_shards, tmp_path):
    folder, manifest = clean_shards
    port = free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
               "WORLD_SIZE": "2"}
        command = [sys.executable, str(READER_SCRIPT), str(folder), str(tmp_path / f"rank{rank}.json"),
                   "--mode", "finite", "--workers", "2"]
        procs.append(subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True))
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    seen = {rank: [k for _, keys in json.loads((tmp_path / f"rank{rank}.json").read_text())["batches"] for k in keys]
            for rank in range(2)}
    everything = seen[0] + seen[1]
    designed = [k for k, fate in manifest["fates"].items() if fate == "pass"]
    assert sorted(everything) == sorted(designed)  # each passing key once: no duplicates, none missing
    assert seen[0] and seen[1]  # both ranks did read
    # ranks read disjoint shards, workers within a rank too
    shards_of = {rank: {k[:5] for k in keys} for rank, keys in seen.items()}
    assert not shards_of[0] & shards_of[1]
