"""Submitting jobs and chains of dependent jobs, and reporting where a chain is.

A chain is the paper's recipe as one submission: stage A, then B's phases, then C's phases, each a
job with its own resources that starts only after the previous one succeeded
(``--dependency=afterok:<id>``; ``--kill-on-invalid-dep=yes`` cancels the rest when one fails).
Jobs are named ``wurst-<pipeline>-<stage>`` so ``squeue`` reads as the recipe. The chain file (JSON)
records job ids, names, run directories and scripts; ``chain_status`` reads it back and asks the
scheduler (squeue, then sacct when accounting is on, else ``scontrol show job``) for each job's state.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from wurst.slurm.template import SlurmConfigError, SlurmJob, render_sbatch, validate

# squeue/scontrol states after which a job will not run again (unless requeued by hand).
FINAL_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
    "SPECIAL_EXIT",
    "REVOKED",
}


class SubmitError(RuntimeError):
    """sbatch refused a job; the message carries sbatch's own words."""


def job_name(pipeline: str, stage: str) -> str:
    """The squeue name of ``stage`` of ``pipeline``: ``wurst-<pipeline>-<stage>``."""
    name = f"wurst-{pipeline}-{stage}"
    if not re.match(r"^[A-Za-z0-9_.+-]+$", name):
        raise SlurmConfigError(
            f"pipeline={pipeline!r} / stage={stage!r} make the job name {name!r}; "
            "use letters, digits and . _ + - only"
        )
    return name


def sbatch(script: str | Path, dependency: str | None = None, kill_on_invalid_dep: bool = True) -> str:
    """``sbatch --parsable [--dependency=...] script`` -> the job id (as a string)."""
    if shutil.which("sbatch") is None:
        raise SubmitError(
            "sbatch is not installed here: submit from a login node of the cluster "
            "(or start the loopback test cluster: python -m wurst.slurm cluster-up)"
        )
    cmd = ["sbatch", "--parsable"]
    if dependency:
        cmd.append(f"--dependency={dependency}")
        if kill_on_invalid_dep:
            cmd.append("--kill-on-invalid-dep=yes")
    cmd.append(str(script))
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise SubmitError(f"sbatch refused {script}: {proc.stderr.strip() or proc.stdout.strip()}")
    # --parsable prints "<id>" or "<id>;<cluster>"
    job_id = proc.stdout.strip().split(";")[0]
    if not job_id.isdigit():
        raise SubmitError(f"sbatch printed {proc.stdout.strip()!r}, not a job id")
    return job_id


def submit(
    job: SlurmJob,
    command: str | Sequence[str],
    script_path: str | Path,
    dependency: str | None = None,
    partitions: Sequence[str] | None = None,
) -> str:
    """Validates ``job``, writes its sbatch script to ``script_path`` and submits it; returns the job id."""
    validate(job, partitions=partitions)
    script_path = Path(script_path)
    script_path.parent.mkdir(parents=True, exist_ok=True)
    # SLURM does not create the log's folder; a missing one makes the job fail without any output.
    base = Path(job.chdir) if job.chdir else Path.cwd()
    for log in (job.output, job.error):
        if log and "%" not in str(Path(log).parent):
            (base / log).parent.mkdir(parents=True, exist_ok=True)
    script_path.write_text(render_sbatch(job, command))
    return sbatch(script_path, dependency=dependency)


@dataclass(frozen=True)
class ChainStep:
    """One job of a chain: a stage (or phase) name, its resources, its command and its run directory."""

    stage: str
    job: SlurmJob
    command: str | Sequence[str]
    run_dir: str


@dataclass
class ChainRecord:
    """What ``submit_chain`` persisted: one entry per job, in order."""

    pipeline: str
    chain_file: str
    submitted_at: str
    jobs: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def load(cls, chain_file: str | Path) -> ChainRecord:
        path = Path(chain_file)
        if not path.is_file():
            raise FileNotFoundError(
                f"chain file {path} not found; `python -m wurst.slurm chain <spec.yaml>` writes it"
            )
        data = json.loads(path.read_text())
        return cls(
            pipeline=data["pipeline"],
            chain_file=str(path),
            submitted_at=data["submitted_at"],
            jobs=list(data["jobs"]),
        )

    def save(self) -> None:
        path = Path(self.chain_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
        tmp.replace(path)

    @property
    def job_ids(self) -> list[str]:
        return [entry["job_id"] for entry in self.jobs]


def submit_chain(
    pipeline: str, steps: Sequence[ChainStep], chain_file: str | Path, partitions: Sequence[str] | None = None
) -> ChainRecord:
    """Submits ``steps`` in order, each ``afterok`` the one before; writes and returns the chain record.

    Every step is validated before the first is submitted, so a bad step submits nothing. Scripts land
    beside the chain file as ``<chain stem>.<stage>.sbatch``. Job names become ``wurst-<pipeline>-<stage>``.
    """
    if not steps:
        raise SlurmConfigError("the chain has no steps: give at least one stage")
    stages = [s.stage for s in steps]
    if len(set(stages)) != len(stages):
        raise SlurmConfigError(f"stage names repeat in the chain {stages}: each step needs its own name")
    chain_file = Path(chain_file).resolve()
    # WURST_CHAIN_FILE tells each job which chain it belongs to (the manifest job records it).
    named = [
        replace(
            s,
            job=replace(
                s.job,
                job_name=job_name(pipeline, s.stage),
                env={**dict(s.job.env), "WURST_CHAIN_FILE": str(chain_file)},
            ),
        )
        for s in steps
    ]
    if partitions is None and any(s.job.partition is not None for s in named):
        from wurst.slurm.template import known_partitions

        partitions = known_partitions()
    for step in named:
        try:
            validate(step.job, partitions=partitions)
        except SlurmConfigError as err:
            raise SlurmConfigError(f"chain step {step.stage!r}: {err}") from None
    record = ChainRecord(
        pipeline=pipeline,
        chain_file=str(chain_file),
        submitted_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    previous: str | None = None
    for step in named:
        script = chain_file.with_name(f"{chain_file.stem}.{step.stage}.sbatch")
        dependency = f"afterok:{previous}" if previous else None
        job_id = submit(step.job, step.command, script, dependency=dependency, partitions=partitions)
        record.jobs.append(
            {
                "stage": step.stage,
                "job_id": job_id,
                "job_name": step.job.job_name,
                "run_dir": str(step.run_dir),
                "script": str(script),
                "depends_on": previous,
            }
        )
        record.save()  # after every submission, so a failure midway still leaves what was submitted
        previous = job_id
    return record


def chain_steps_from_spec(
    spec: Mapping[str, Any],
    defaults: Mapping[str, Any] | None = None,
    append: Sequence[str] = (),
) -> tuple[str, list[ChainStep]]:
    """(pipeline, steps) from a chain spec mapping (``conf/slurm/chain/*.yaml``, interpolations resolved).

    Spec: ``pipeline: <name>``, ``slurm: {<SlurmJob fields shared by all steps>}``, ``steps: [{stage,
    command, run_dir, slurm: {<SlurmJob fields for this step>}, append: true}]``; ``defaults`` (e.g. a
    ``conf/slurm/<cluster>.yaml``) sits under the shared block. ``env`` maps are merged, not replaced.
    ``append``: arguments added to the command of every step whose ``append`` is not false (Hydra
    overrides for every training job, e.g. ``logger=csv trainer.max_steps=4``).
    """
    for key in ("pipeline", "steps"):
        if key not in spec:
            raise SlurmConfigError(f"chain spec has no {key!r}; it needs pipeline: <name> and steps: [...]")
    shared = dict(spec.get("slurm") or {})
    base = {
        **dict(defaults or {}),
        **shared,
        "env": {**dict((defaults or {}).get("env") or {}), **dict(shared.get("env") or {})},
    }
    steps = []
    for i, entry in enumerate(spec["steps"]):
        missing = [k for k in ("stage", "command", "run_dir") if k not in entry]
        if missing:
            raise SlurmConfigError(
                f"chain step #{i} lacks {missing}; each step needs stage, command and run_dir"
            )
        unknown = sorted(set(entry) - {"stage", "command", "run_dir", "slurm", "append"})
        if unknown:
            raise SlurmConfigError(
                f"chain step {entry['stage']!r} has unknown key(s) {unknown}; put SLURM settings under slurm:"
            )
        env = {**dict(base.get("env") or {}), **dict((entry.get("slurm") or {}).get("env") or {})}
        job = SlurmJob.from_mapping(
            {
                **base,
                **dict(entry.get("slurm") or {}),
                "env": env,
                "job_name": job_name(str(spec["pipeline"]), str(entry["stage"])),
            }
        )
        command = entry["command"]
        command = command if isinstance(command, str) else [str(c) for c in command]
        if append and entry.get("append", True):
            extra = [str(a) for a in append]
            command = f"{command} {shlex.join(extra)}" if isinstance(command, str) else [*command, *extra]
        steps.append(
            ChainStep(stage=str(entry["stage"]), job=job, command=command, run_dir=str(entry["run_dir"]))
        )
    return str(spec["pipeline"]), steps


# -- status ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobStatus:
    """One job's state as the scheduler reports it (``source``: squeue, sacct, scontrol or none)."""

    job_id: str
    state: str
    reason: str = ""
    elapsed: str = ""
    nodes: str = ""
    exit_code: str = ""
    restarts: str = ""
    source: str = "none"

    @property
    def finished(self) -> bool:
        return self.state in FINAL_STATES


def _squeue(job_id: str) -> JobStatus | None:
    proc = subprocess.run(
        ["squeue", "-h", "--states=all", "-j", job_id, "-o", "%i|%T|%r|%M|%N"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if proc.returncode != 0:
        return None
    for line in proc.stdout.splitlines():
        parts = line.split("|")
        if len(parts) == 5 and parts[0] == job_id:
            reason = "" if parts[2] in ("None", "(null)") else parts[2]
            return JobStatus(job_id, parts[1], reason, parts[3], parts[4], source="squeue")
    return None


def _sacct(job_id: str) -> JobStatus | None:
    if shutil.which("sacct") is None:
        return None
    proc = subprocess.run(
        ["sacct", "-n", "-P", "-X", "-j", job_id, "--format=JobID,State,ExitCode,Elapsed,NodeList"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    # Without accounting storage sacct exits non-zero ("Slurm accounting storage is disabled").
    if proc.returncode != 0:
        return None
    for line in proc.stdout.splitlines():
        parts = line.split("|")
        if len(parts) == 5 and parts[0] == job_id:
            return JobStatus(
                job_id,
                parts[1].split()[0],
                elapsed=parts[3],
                nodes=parts[4],
                exit_code=parts[2],
                source="sacct",
            )
    return None


def _scontrol(job_id: str) -> JobStatus | None:
    proc = subprocess.run(
        ["scontrol", "show", "job", "-o", job_id], check=False, capture_output=True, text=True, timeout=60
    )
    if proc.returncode != 0 or "JobId=" not in proc.stdout:
        return None
    fields_ = dict(re.findall(r"(\w+)=(\S*)", proc.stdout))
    reason = fields_.get("Reason", "")
    return JobStatus(
        job_id,
        fields_.get("JobState", "UNKNOWN"),
        "" if reason == "None" else reason,
        fields_.get("RunTime", ""),
        fields_.get("NodeList", ""),
        fields_.get("ExitCode", ""),
        fields_.get("Restarts", ""),
        source="scontrol",
    )


def job_status(job_id: str) -> JobStatus:
    """The job's state from squeue (live and recently finished jobs; exit code and restart count added
    from ``scontrol show job``), else sacct when accounting is on, else ``scontrol show job``;
    ``UNKNOWN`` when every source has forgotten the job."""
    status = _squeue(job_id)
    if status is not None:
        detail = _scontrol(job_id)
        if detail is not None:
            status = replace(status, exit_code=detail.exit_code, restarts=detail.restarts)
        return status
    for probe in (_sacct, _scontrol):
        status = probe(job_id)
        if status is not None:
            return status
    return JobStatus(job_id, "UNKNOWN", "the controller and accounting have no record of it")


def chain_status(chain_file: str | Path) -> list[dict[str, Any]]:
    """Each chain job's record entry merged with its ``JobStatus`` fields, in chain order."""
    record = ChainRecord.load(chain_file)
    rows = []
    for entry in record.jobs:
        rows.append({**entry, **asdict(job_status(entry["job_id"]))})
    return rows


def format_chain_status(chain_file: str | Path) -> str:
    """A table of the chain's jobs and a headline saying where the chain is."""
    record = ChainRecord.load(chain_file)
    rows = chain_status(chain_file)
    done = sum(1 for r in rows if r["state"] == "COMPLETED")
    failed = [r for r in rows if r["state"] in FINAL_STATES and r["state"] != "COMPLETED"]
    active = [r for r in rows if r["state"] not in FINAL_STATES]
    if failed:
        where = f"stopped: {failed[0]['stage']} {failed[0]['state']}"
    elif done == len(rows):
        where = "finished"
    else:
        current = active[0]
        where = f"at {current['stage']}: {current['state']}" + (
            f" ({current['reason']})" if current["reason"] else ""
        )
    headline = f"chain {record.pipeline} ({Path(chain_file)}): {done}/{len(rows)} done, {where}"
    header = ["stage", "job", "name", "state", "reason", "elapsed", "nodes", "exit", "restarts", "run_dir"]
    table = [
        [
            r["stage"],
            r["job_id"],
            r["job_name"],
            r["state"],
            r["reason"],
            r["elapsed"],
            r["nodes"],
            r["exit_code"],
            r["restarts"],
            r["run_dir"],
        ]
        for r in rows
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *table)]
    lines = [headline, "  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip() for row in table]
    return "\n".join(lines)
