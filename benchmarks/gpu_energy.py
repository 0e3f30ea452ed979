"""The NVML energy counter against board power × time, on a GPU kept busy for a fixed time.

    python benchmarks/gpu_energy.py [--seconds 30] [--json PATH]

The carbon ledger (train/accounting) uses NVML's total-energy counter when the GPU has one and the
board power of conf/accounting/tables/board_power.yaml × time otherwise; this measures how far apart the
two are on this GPU under a sustained bf16 matmul load, and samples NVML's instantaneous power as a third
figure. Needs a CUDA GPU and nvidia-ml-py.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_energy.py: no CUDA GPU visible to torch")
    import pynvml

    from wurst.train.accounting.power import board_power_watts

    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
    name = torch.cuda.get_device_name()
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    start_mj = pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
    start, samples, matmuls = time.perf_counter(), [], 0
    while time.perf_counter() - start < args.seconds:
        for _ in range(20):
            a @ b
        matmuls += 20
        torch.cuda.synchronize()
        samples.append(pynvml.nvmlDeviceGetPowerUsage(handle) / 1000.0)
    seconds = time.perf_counter() - start
    measured_j = (pynvml.nvmlDeviceGetTotalEnergyConsumption(handle) - start_mj) / 1000.0
    board_w = board_power_watts(name)
    result = {
        "device": name,
        "seconds": seconds,
        "tflops": 2 * 8192**3 * matmuls / seconds / 1e12,
        "nvml_energy_j": measured_j,
        "nvml_mean_power_w": measured_j / seconds,
        "sampled_power_w": sum(samples) / len(samples),
        "board_power_w": board_w,
        "board_power_energy_j": board_w * seconds if board_w else None,
        "board_over_measured": (board_w * seconds / measured_j) if board_w and measured_j else None,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
