"""gpu_table.sh's JSON files → gpu_table.json and the README's markdown table.

    python benchmarks/gpu_table.py OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROWS = (("c12", "Stage C 12×12"), ("c24", "Stage C 24×24"), ("b512", "Stage B 512 px"))


def _cell(value, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def table(out: Path) -> tuple[str, dict]:
    collected: dict = {"rows": []}
    device = None
    lines = ["| setting | run | batch | samples/s | step (ms) | peak memory (GiB) | MFU | vs reference |",
             "|---|---|---|---|---|---|---|---|"]
    for name, label in ROWS:
        for suffix, compiled in (("", False), ("_compile", True)):
            path = out / f"{name}{suffix}.json"
            if not path.is_file():
                lines.append(f"| {label} | {'compiled' if compiled else 'eager'} | — | not measured (no {path.name}) |"
                             " | | | |")
                continue
            result = json.loads(path.read_text())
            device = device or result["setup"].get("device_name")
            for run in result["runs"]:
                if compiled and run["impl"] == "reference":
                    continue
                what = f"{run.get('run', run['impl'])}{', compiled' if compiled else ''}"
                if "error" in run:
                    lines.append(f"| {label} | {what} | {run.get('batch', '—')} | error: {run['error'][:60]} | | | | |")
                    continue
                peak = run.get("peak_memory_bytes")
                lines.append(
                    f"| {label} | {what} | {run['batch']} | {_cell(run.get('samples_per_s'), '.1f')} | "
                    f"{_cell(run.get('step_s_median') and run['step_s_median'] * 1e3, '.0f')} | "
                    f"{_cell(peak and peak / 2**30, '.1f')} | {_cell(run.get('mfu'), '.0%')} | "
                    f"{_cell(run.get('speedup_vs_reference'), '.2f')}× |"
                )
                collected["rows"].append({"setting": label, "compiled": compiled, **{
                    k: run.get(k) for k in ("impl", "run", "batch", "samples_per_s", "step_s_median",
                                            "peak_memory_bytes", "mfu", "speedup_vs_reference")}})
    energy_path = out / "energy.json"
    text = [f"GPU: {device or 'unknown'}", "", *lines]
    if energy_path.is_file():
        energy = json.loads(energy_path.read_text())
        collected["energy"] = energy
        text += ["", (f"Energy over {energy['seconds']:.0f} s of bf16 matmuls ({energy['tflops']:.0f} TFLOP/s): NVML counter "
                      f"{energy['nvml_mean_power_w']:.0f} W mean, sampled {energy['sampled_power_w']:.0f} W, board power "
                      f"{_cell(energy.get('board_power_w'), '.0f')} W (board / measured = "
                      f"{_cell(energy.get('board_over_measured'), '.2f')}).")]
    collected["device"] = device
    return "\n".join(text), collected


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "outputs/gpu_table")
    markdown, collected = table(out)
    (out / "gpu_table.json").write_text(json.dumps(collected, indent=2) + "\n")
    print(markdown)


if __name__ == "__main__":
    main()
