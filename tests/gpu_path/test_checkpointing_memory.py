"""Gradient checkpointing cuts the measured peak memory of a training step (issue 18, on the CPU).

A mid-size Stage C (c = 512, depth 4, 24×24 latents, batch 8) takes one forward + backward in a fresh
process, with and without ``gradient_checkpointing``; the peak resident memory of each process (its
``ru_maxrss``) is compared. The paper-size figures are predicted on the meta device by
``benchmarks/bench_finetune_memory.py`` (README, "Fine-tune" and "Training throughput").
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

STEP = """
import resource, sys, torch
from wurst.models.stage_c import StageC
torch.manual_seed(0)
net = StageC(c_in=16, c=512, c_cond=256, c_r=64, depth=4, nhead=8, dropout=0.0,
             gradient_checkpointing=sys.argv[1] == "on")
x, r, c = torch.randn(8, 16, 24, 24), torch.rand(8), torch.randn(8, 77, 256)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
net(x, r, c).square().mean().backward()
print(before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def peak_kib(checkpointing: str) -> tuple[int, int]:
    done = subprocess.run([sys.executable, "-c", STEP, checkpointing], capture_output=True, text=True, timeout=300,
                          check=False, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    before, after = (int(v) for v in done.stdout.split()[-2:])
    return before, after


@pytest.mark.slow
def test_gradient_checkpointing_cuts_the_peak_memory_of_a_step():
    (base_off, peak_off), (base_on, peak_on) = peak_kib("off"), peak_kib("on")
    step_off, step_on = peak_off - base_off, peak_on - base_on
    print(f"step memory (peak RSS growth): {step_off / 1024:.0f} MiB without, {step_on / 1024:.0f} MiB with checkpointing")
    assert step_on < 0.8 * step_off  # measured: 1,293 → 850 MiB on a loaded 2-core machine
