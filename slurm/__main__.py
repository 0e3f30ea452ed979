"""``python -m wurst.slurm {submit,chain,status,manifest,cluster-up,cluster-down}``.

  python -m wurst.slurm submit --config conf/slurm/default.yaml --set nodes=2 --set time=48:00:00 \\
      --script outputs/jobs/c_p1.sbatch -- wurst-train experiment=paper_v2/stage_c_p1
  python -m wurst.slurm chain conf/slurm/chain/paper_v2.yaml --config conf/slurm/default.yaml \\
      [-- <overrides appended to every training step, e.g. logger=csv>]
  python -m wurst.slurm status outputs/paper_v2/chain.json [--watch 30]
  python -m wurst.slurm manifest outputs/paper_v2 --pipeline paper_v2   # the chain's last job runs this
  python -m wurst.slurm cluster-up [--state-dir /tmp/wurst-slurm]    # prints: export SLURM_CONF=...
  python -m wurst.slurm cluster-down [--state-dir /tmp/wurst-slurm]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf

from wurst.slurm.cluster import ClusterError, LoopbackCluster
from wurst.slurm.manifest import write_pipeline_manifest
from wurst.slurm.submit import (
    FINAL_STATES,
    SubmitError,
    chain_status,
    chain_steps_from_spec,
    format_chain_status,
    submit,
    submit_chain,
)
from wurst.slurm.template import SlurmConfigError, SlurmJob, render_sbatch, validate

DEFAULT_STATE_DIR = "/tmp/wurst-slurm"


def _load_mapping(path: str | None) -> dict[str, Any]:
    if path is None:
        return {}
    file = Path(path)
    if not file.is_file():
        raise SlurmConfigError(
            f"--config {path}: no such file; the clusters' settings live in conf/slurm/*.yaml"
        )
    cfg = OmegaConf.load(file)
    return OmegaConf.to_container(cfg, resolve=True) or {}


def _apply_sets(values: dict[str, Any], sets: list[str]) -> dict[str, Any]:
    """``--set key=value`` (value parsed as YAML; ``env.NAME=value`` sets one environment variable)."""
    out = {**values, "env": dict(values.get("env") or {})}
    for item in sets:
        if "=" not in item:
            raise SlurmConfigError(f"--set {item!r}: expected key=value, e.g. --set nodes=2")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw else None
        if key.startswith("env."):
            out["env"][key[4:]] = str(value)
        else:
            out[key] = value
    return out


def _cmd_submit(args: argparse.Namespace) -> int:
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise SlurmConfigError("no command: put the program after `--`, e.g. -- wurst-train stage=a")
    job = SlurmJob.from_mapping(_apply_sets(_load_mapping(args.config), args.set))
    if args.dry_run:
        validate(job, check_partition=False)
        print(render_sbatch(job, command))
        return 0
    script = Path(args.script or f"{job.job_name}.sbatch")
    print(submit(job, command, script, dependency=args.dependency))
    return 0


def _cmd_chain(args: argparse.Namespace) -> int:
    spec = _load_mapping(args.spec)
    defaults = _apply_sets(_load_mapping(args.config), args.set)
    pipeline, steps = chain_steps_from_spec(spec, defaults, append=args.overrides)
    chain_file = Path(args.chain_file or Path(args.spec).with_suffix(".chain.json").name)
    if args.dry_run:
        for step in steps:
            validate(step.job, check_partition=False)
            print(f"# ---- {step.stage} -> {step.run_dir}")
            print(render_sbatch(step.job, step.command))
        return 0
    record = submit_chain(pipeline, steps, chain_file)
    for entry in record.jobs:
        print(f"{entry['job_id']}\t{entry['job_name']}\t{entry['run_dir']}")
    print(f"chain file: {record.chain_file}  (python -m wurst.slurm status {record.chain_file})")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    while True:
        print(format_chain_status(args.chain_file), flush=True)
        rows = chain_status(args.chain_file)
        if not args.watch or all(r["state"] in FINAL_STATES for r in rows):
            failed = any(r["state"] in FINAL_STATES and r["state"] != "COMPLETED" for r in rows)
            return 1 if failed else 0
        time.sleep(args.watch)
        print()


def _cmd_manifest(args: argparse.Namespace) -> int:
    print(write_pipeline_manifest(args.pipeline_dir, args.pipeline))
    return 0


def _cmd_cluster_up(args: argparse.Namespace) -> int:
    env = LoopbackCluster(args.state_dir).up()
    for key, value in env.items():
        print(f"export {key}={value}")
    return 0


def _cmd_cluster_down(args: argparse.Namespace) -> int:
    LoopbackCluster(args.state_dir).down()
    print(f"stopped the loopback cluster in {args.state_dir}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m wurst.slurm", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("submit", help="render and submit one sbatch job")
    p.add_argument("--config", help="a conf/slurm/*.yaml with the job's resources")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one setting")
    p.add_argument("--script", help="where to write the sbatch script (default: <job_name>.sbatch)")
    p.add_argument("--dependency", help="sbatch --dependency value, e.g. afterok:123")
    p.add_argument("--dry-run", action="store_true", help="print the script, submit nothing")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the program srun launches")
    p.set_defaults(func=_cmd_submit)

    p = sub.add_parser("chain", help="submit a chain of dependent jobs (afterok) from a spec")
    p.add_argument("spec", help="chain spec YAML (conf/slurm/chain/*.yaml)")
    p.add_argument("--config", help="a conf/slurm/*.yaml with the cluster's default resources")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a default setting"
    )
    p.add_argument("--chain-file", help="where to record the chain (default: <spec stem>.chain.json)")
    p.add_argument("--dry-run", action="store_true", help="print the scripts, submit nothing")
    p.set_defaults(func=_cmd_chain, overrides=[])

    p = sub.add_parser("manifest", help="write <pipeline_dir>/pipeline.json once A, B and C have exports")
    p.add_argument("pipeline_dir")
    p.add_argument("--pipeline", required=True, help="the pipeline's name, e.g. tiny or paper_v2")
    p.set_defaults(func=_cmd_manifest)

    p = sub.add_parser("status", help="where a submitted chain is")
    p.add_argument("chain_file")
    p.add_argument(
        "--watch", type=float, default=0, metavar="SECONDS", help="repeat until every job finished"
    )
    p.set_defaults(func=_cmd_status)

    for name, func, text in (
        ("cluster-up", _cmd_cluster_up, "start the two-node loopback test cluster"),
        ("cluster-down", _cmd_cluster_down, "stop it and clean up"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("--state-dir", default=DEFAULT_STATE_DIR)
        p.set_defaults(func=func)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides: list[str] = []
    if argv[:1] == ["chain"] and "--" in argv:  # chain <spec> [options] -- <appended to every step>
        cut = argv.index("--")
        argv, overrides = argv[:cut], argv[cut + 1 :]
    args = build_parser().parse_args(argv)
    if args.cmd == "chain":
        args.overrides = overrides
    try:
        return args.func(args)
    except (SlurmConfigError, SubmitError, ClusterError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
