"""``wurst-carbon``: what a run or pipeline cost, an estimate from GPU hours, a projection to the paper recipe.

    wurst-carbon report outputs/tiny                 # a pipeline directory: Table 2 shape, paper rows beside
    wurst-carbon report outputs/tiny/stage_c         # one stage run directory
    wurst-carbon estimate --gpu A100-PCIE-40GB --gpu-hours 24602 --carbon-intensity 0.37
    wurst-carbon project outputs/bench/stage_c_p1 --recipe conf/experiment/paper_v2
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from wurst.train.accounting.carbon import (
    co2_kg,
    default_pue,
    energy_kwh,
    resolve_carbon_intensity,
    round_half_even,
)
from wurst.train.accounting.ledger import read_run_ledger
from wurst.train.accounting.pipeline import is_pipeline_dir, read_pipeline, table2
from wurst.train.accounting.power import board_power_table, board_power_watts, canonical_device_name
from wurst.train.accounting.projection import DEFAULT_RECIPE, project, read_recipe, render


def _add_carbon_args(parser: argparse.ArgumentParser, defaults_from: str) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--carbon-intensity", type=float, help=f"kg CO2eq per kWh (default: {defaults_from})")
    group.add_argument("--region", help="a preset from conf/accounting/tables/carbon.yaml instead of a figure")
    parser.add_argument("--pue", type=float, help=f"power usage effectiveness (default: {defaults_from})")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wurst-carbon", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    report = commands.add_parser("report", help="ledger of a stage run or a pipeline directory")
    report.add_argument("path", type=Path, help="a stage run directory or a pipeline directory")
    report.add_argument("--json", action="store_true", help="JSON instead of a table")

    estimate = commands.add_parser("estimate", help="energy and CO2 of GPU hours (board power × hours)")
    estimate.add_argument("--gpu", required=True, help="GPU model, e.g. A100-PCIE-40GB (see the board-power table)")
    estimate.add_argument("--gpu-hours", type=float, required=True, help="device-hours")
    estimate.add_argument("--watts", type=float, help="board power to use instead of the table's")
    _add_carbon_args(estimate, "the default region's preset / PUE 1.0")

    projection = commands.add_parser("project", help="cost of the paper_v2 recipe at a measured run's throughput")
    projection.add_argument("run_dir", type=Path, help="a stage run directory with a ledger")
    projection.add_argument("--recipe", type=Path, default=DEFAULT_RECIPE, help="directory of phase yaml files")
    projection.add_argument("--phases", default="*", help="glob over phase names, e.g. 'stage_c_*'")
    projection.add_argument("--json", action="store_true", help="JSON instead of a table")
    _add_carbon_args(projection, "the run's own")
    return parser


def _estimate(args: argparse.Namespace) -> dict:
    watts = args.watts if args.watts is not None else board_power_watts(args.gpu)
    if watts is None:
        raise ValueError(
            f"--gpu {args.gpu!r} is not in the board-power table (conf/accounting/tables/board_power.yaml); "
            f"known: {', '.join(board_power_table())}. Pass --watts with its board power"
        )
    intensity = resolve_carbon_intensity(args.carbon_intensity, args.region)
    pue = default_pue() if args.pue is None else args.pue
    energy = energy_kwh(args.gpu_hours, watts)
    return {
        "gpu": canonical_device_name(args.gpu) or args.gpu,
        "board_power_w": watts,
        "gpu_hours": args.gpu_hours,
        "pue": pue,
        "carbon_intensity_kg_per_kwh": intensity,
        "energy_kwh": round_half_even(energy),
        "co2_kg": round_half_even(co2_kg(energy, pue, intensity)),
    }


def _report(args: argparse.Namespace) -> str:
    if is_pipeline_dir(args.path):
        pipeline = read_pipeline(args.path)
        return json.dumps(pipeline.to_dict(), indent=2) if args.json else table2(pipeline)
    ledger, source = read_run_ledger(args.path)
    if args.json:
        return json.dumps({"source": str(source), "accounting": ledger.to_dict()}, indent=2)
    rows = [(k, v) for k, v in ledger.to_dict().items() if k != "per_rank"]
    lines = [f"ledger of {args.path} (from {source})", "", "| field | value |", "|---|---|"]
    lines += [f"| {k} | {v:.6g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in rows]
    for rank, share in enumerate(ledger.per_rank or []):
        lines.append(f"| rank {rank} | {share['device_hours']:.6g} device-hours, {share['energy_kwh']:.6g} kWh, "
                     f"{share['samples']:.0f} samples |")
    return "\n".join(lines)


def _project(args: argparse.Namespace) -> str:
    ledger, _ = read_run_ledger(args.run_dir)
    intensity = None
    if args.carbon_intensity is not None or args.region is not None:
        intensity = resolve_carbon_intensity(args.carbon_intensity, args.region)
    result = project(ledger, read_recipe(args.recipe, args.phases), pue=args.pue, carbon_intensity_kg_per_kwh=intensity)
    return json.dumps(result.to_dict(), indent=2) if args.json else render(result)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "estimate":
            print(json.dumps(_estimate(args), indent=2))
        elif args.command == "report":
            print(_report(args))
        else:
            print(_project(args))
    except (ValueError, TypeError, FileNotFoundError) as error:
        print(f"wurst-carbon {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
