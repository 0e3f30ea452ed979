"""Fixtures for the training-step benchmark: one tiny CPU run per stage, shared by the tests that read it."""

from __future__ import annotations

import contextlib
import io
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # benchmarks/ is a folder of scripts, not an installed package
    sys.path.insert(0, str(REPO))

# Few steps: these runs check that the benchmark works and reports sane figures, not the figures.
TINY_ARGS = ["--config", "tiny", "--device", "cpu", "--steps", "2", "--warmup", "2", "--threads", "1"]


def run_benchmark(argv: list[str]) -> dict:
    """``bench_train_step.main(argv)`` with its stdout captured (``result["stdout"]``) and its wall time
    (``result["elapsed_s"]``, imports excluded)."""
    from benchmarks.bench_train_step import main

    threads = torch.get_num_threads()
    out = io.StringIO()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(out):
            result = main(argv)
    finally:
        torch.set_num_threads(threads)
    result["elapsed_s"] = time.perf_counter() - start
    result["stdout"] = out.getvalue()
    return result


@pytest.fixture
def tiny_args() -> list[str]:
    return list(TINY_ARGS)


@pytest.fixture
def benchmark_runner():
    """:func:`run_benchmark`, for tests that need a run of their own."""
    return run_benchmark


@pytest.fixture(scope="module")
def stage_c_result(tmp_path_factory) -> dict:
    """Stage C, tiny, CPU: ours from images and from cache, and the reference loop (from images)."""
    json_path = tmp_path_factory.mktemp("bench_c") / "result.json"
    return run_benchmark([*TINY_ARGS, "--stage", "c", "--json", str(json_path)])


@pytest.fixture(scope="module")
def stage_b_result(tmp_path_factory) -> dict:
    """Stage B, tiny, CPU: ours from images and the reference loop."""
    json_path = tmp_path_factory.mktemp("bench_b") / "result.json"
    return run_benchmark([*TINY_ARGS, "--stage", "b", "--json", str(json_path)])
