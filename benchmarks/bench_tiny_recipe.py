"""Learning speed of the tiny recipe (issue 16): prompt accuracy against CPU minutes, and where the
minutes of `make run` go, so the next change to the recipe is measured, not guessed.

    python benchmarks/bench_tiny_recipe.py --run outputs/tiny                # figures of a finished pipeline
    python benchmarks/bench_tiny_recipe.py --budgets 0.25,0.5,1 --out /tmp/bench_tiny [--threads 2]

``--run``: per stage steps, wall minutes and steps/s (the export's accounting) and, when the pipeline
report wrote it, the prompt check (``prompt_fidelity.json``).
``--budgets``: trains Stage A once with the recipe, then Stage B and Stage C at each fraction of their
recipe steps (each budget its own pipeline directory sharing that Stage A), timing each stage's process
(wall and CPU seconds, ``getrusage`` of the child), and scores every pipeline with the prompt check.
Prints markdown tables (note the machine's load beside them: shared cores make wall time pessimistic;
CPU seconds are the steadier figure) and writes ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("a", "b", "c")


def recipe_steps() -> dict[str, int]:
    """Each stage's ``trainer.max_steps`` in conf/recipe_stage/tiny_<stage>.yaml."""
    return {s: int(OmegaConf.load(ROOT / "conf" / "recipe_stage" / f"tiny_{s}.yaml").trainer.max_steps)
            for s in STAGES}


def stage_figures(pipeline_dir: Path) -> dict[str, dict[str, float]]:
    """Steps, wall minutes and steps/s per stage from the exports' accounting."""
    figures = {}
    for stage in STAGES:
        provenance = pipeline_dir / f"stage_{stage}" / "export" / "provenance.json"
        if not provenance.is_file():
            continue
        content = json.loads(provenance.read_text())
        wall_s = float(content["accounting"]["wall_hours"]) * 3600
        figures[stage] = {"steps": int(content["steps"]), "wall_min": round(wall_s / 60, 2),
                          "steps_per_s": round(content["steps"] / max(wall_s, 1e-9), 2),
                          "samples_per_s": round(float(content["accounting"]["samples_per_s"]), 1)}
    return figures


def run_stage(stage: str, output_dir: Path, steps: int, threads: int, extra: list[str]) -> dict[str, float]:
    """One ``wurst-train stage=<stage> experiment=tiny`` process; its wall and CPU seconds."""
    argv = [sys.executable, "-m", "wurst.train", f"stage={stage}", "experiment=tiny", "logger=csv",
            "callbacks.progress_bar=false", f"paths.output_dir={output_dir}", f"trainer.max_steps={steps}", *extra]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.time()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    result = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    wall = time.time() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        raise SystemExit(f"stage {stage} failed ({' '.join(argv)}):\n{result.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"steps": steps, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "steps_per_s": round(steps / wall, 2)}


def budget_curve(out: Path, budgets: list[float], threads: int, data_dir: Path, count: int) -> list[dict[str, Any]]:
    from wurst.train.prompt_fidelity import prompt_fidelity

    steps = recipe_steps()
    shared = [f"paths.data_dir={data_dir}"]
    base = out / "stage_a_run"
    timing_a = run_stage("a", base, steps["a"], threads, shared)
    rows = []
    for budget in budgets:
        run = out / f"budget_{budget:g}"
        pipeline = run / "tiny"
        pipeline.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(pipeline / "stage_a", ignore_errors=True)
        shutil.copytree(base / "tiny" / "stage_a", pipeline / "stage_a")
        timing = {"a": timing_a}
        for stage in ("b", "c"):
            timing[stage] = run_stage(stage, run, max(1, round(budget * steps[stage])), threads, shared)
        check = prompt_fidelity(pipeline, count=count)
        rows.append({"budget": budget, "timing": timing,
                     "cpu_min": round(sum(t["cpu_s"] for t in timing.values()) / 60, 2),
                     "wall_min": round(sum(t["wall_s"] for t in timing.values()) / 60, 2),
                     "stage_a_psnr_db": check["stage_a"]["psnr_db"], "stage_b": check["stage_b"],
                     "cascade": check["cascade"]})
        print(curve_table(rows), flush=True)
    return rows


def curve_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| budget | B steps | C steps | CPU min (A/B/C) | wall min | B ceiling all-3 | cascade bg | fg | shape | all-3 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        t, c = row["timing"], row["cascade"]
        cpu = "/".join(f"{t[s]['cpu_s'] / 60:.1f}" for s in STAGES)
        lines.append(f"| {row['budget']:g} | {t['b']['steps']} | {t['c']['steps']} | {row['cpu_min']:.1f} ({cpu}) | "
                     f"{row['wall_min']:.1f} | {row['stage_b']['all_three']:.0%} | {c['background']:.0%} | "
                     f"{c['foreground']:.0%} | {c['shape']:.0%} | {c['all_three']:.0%} |")
    return "\n".join(lines)


def run_table(pipeline_dir: Path) -> tuple[str, dict[str, Any]]:
    figures = stage_figures(pipeline_dir)
    lines = ["| stage | steps | wall min | steps/s | samples/s |", "|---|---|---|---|---|"]
    for stage, f in figures.items():
        lines.append(f"| {stage.upper()} | {f['steps']} | {f['wall_min']} | {f['steps_per_s']} | {f['samples_per_s']} |")
    result: dict[str, Any] = {"stages": figures}
    manifest = pipeline_dir / "pipeline.json"
    if manifest.is_file():
        result["pipeline_wall_min"] = round(json.loads(manifest.read_text()).get("wall_seconds", 0) / 60, 2)
        lines.append(f"\npipeline wall (training, all stages): {result['pipeline_wall_min']} min")
    check_path = pipeline_dir / "prompt_fidelity.json"
    if check_path.is_file():
        from wurst.train.prompt_fidelity import summary_lines

        result["prompt_fidelity"] = json.loads(check_path.read_text())
        lines += ["", *summary_lines(result["prompt_fidelity"])]
    return "\n".join(lines), result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, help="a finished tiny pipeline directory (outputs/tiny)")
    parser.add_argument("--budgets", default=None, help="comma-separated fractions of the B and C recipe steps")
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench_tiny_recipe"))
    parser.add_argument("--data-dir", type=Path, default=None, help="synthetic shards (default: <out>/data)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--count", type=int, default=96, help="held-out prompts per check")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    load = os.getloadavg()
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} cores")
    if args.run:
        table, result = run_table(args.run)
        print(table)
    elif args.budgets:
        budgets = [float(b) for b in args.budgets.split(",")]
        rows = budget_curve(args.out, budgets, args.threads, args.data_dir or args.out / "data", args.count)
        result = {"curve": rows}
    else:
        parser.error("give --run DIR or --budgets F1,F2,...")
    result["load_average"] = list(load)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
