"""Step clock, peak memory and host-sync counter (benchmarks/step_meters.py)."""

from __future__ import annotations

import time

import pytest
import torch

from benchmarks.step_meters import HostSyncCounter, PeakMemory, StepClock, summarise_steps


def test_item_and_bool_are_counted_with_their_call_site():
    x = torch.randn(8)
    with HostSyncCounter() as counter:
        x.sum().item()
        bool((x > 10).any())
    assert counter.count == 2
    assert all(site.startswith("tests/bench/test_step_meters.py:") for site in counter.sites)


def test_tensor_math_without_reads_is_not_counted():
    x = torch.randn(8, 8, requires_grad=True)
    with HostSyncCounter() as counter:
        (x @ x).relu().sum().backward()
        torch.isfinite(x.grad).all()  # a tensor, not read on the host
    assert counter.count == 0


def test_nonzero_is_counted():
    with HostSyncCounter() as counter:
        torch.arange(5).nonzero()
    assert counter.count == 1


def test_device_filter_skips_reads_of_tensors_elsewhere():
    # On a GPU run only reads of CUDA tensors are syncs; a CPU tensor's .item() is not.
    with HostSyncCounter("cuda") as counter:
        torch.rand(()).item()
    assert counter.count == 0


def test_step_clock_times_the_steps_after_warm_up():
    clock = StepClock(torch.device("cpu"))
    for pause in (0.0, 0.0, 0.02, 0.02, 0.02):
        time.sleep(pause)
        clock.mark()
    seconds = clock.step_seconds(skip=2)
    assert len(seconds) == 3
    assert all(s >= 0.02 for s in seconds)
    assert len(clock.cpu_seconds(skip=2)) == 3


def test_step_clock_with_too_few_marks_names_the_fix():
    clock = StepClock(torch.device("cpu"))
    clock.mark()
    clock.mark()
    with pytest.raises(ValueError, match="raise --steps"):
        clock.step_seconds(skip=2)


def test_summary_reports_samples_per_second_at_the_median_step():
    summary = summarise_steps([0.5, 0.25, 1.0], samples_per_step=8)
    assert summary["step_s_median"] == 0.5
    assert summary["samples_per_s"] == 16
    assert summary["samples_per_s_mean"] == pytest.approx(24 / 1.75)


def test_cpu_peak_memory_sees_a_large_allocation():
    memory = PeakMemory(torch.device("cpu"))
    memory.reset()
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, written so the pages are resident
    peak = memory.read()
    del block
    assert peak - memory.baseline >= 60 * 2**20
