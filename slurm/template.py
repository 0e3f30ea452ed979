"""The sbatch script: one job's resources (``SlurmJob``, from ``conf/slurm/*.yaml``) and its command.

The rendered script asks SLURM for ``nodes`` × ``tasks_per_node`` tasks (one per GPU), launches the
command once per task with ``srun``, and lets Lightning's ``SLURMEnvironment`` read rank, world size
and the rendezvous address (the first host of SLURM_NODELIST) from the environment srun sets.
``--signal=USR1@<s>`` plus ``--requeue`` give the trainer a warning before the time limit, after which
it checkpoints and requeues itself (see ``slurm/preemption.py``).

``validate`` catches, before anything is submitted, what SLURM would reject late or silently run
wrong: a GPU count that does not match the task count, a partition the cluster does not have, a
warning signal that would come after the time limit.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

# Variables of a launcher's rendezvous that sbatch would copy from the submitting environment.
INHERITED_RENDEZVOUS = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK")

# Signals a trainer can catch; `B:` sends it to the batch shell only (we want the srun tasks).
_SIGNAL_RE = re.compile(r"^(?:R?B?:)?(?:SIG)?(USR1|USR2|TERM|INT|HUP|URG|\d+)$")
_JOB_NAME_RE = re.compile(r"^[A-Za-z0-9_.+-]+$")
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# slurmctld sends the warning signal when remaining time <= warn time + its 30 s check period
# (PERIODIC_TIMEOUT in slurmctld), so a warning must leave room for that too.
SLURMCTLD_CHECK_PERIOD_S = 30


class SlurmConfigError(ValueError):
    """A job's SLURM settings are wrong; the message names the setting and the fix."""


@dataclass(frozen=True)
class SlurmJob:
    """One sbatch job's resources; field names are the keys of ``conf/slurm/*.yaml``.

    ``time`` takes sbatch's formats ("90" minutes, "4:00:00", "2-00:00:00"). ``signal_seconds`` is
    how long before the limit the trainer is warned (``--signal=<requeue_signal>@<s>``); ``None``
    sends no warning. ``env`` becomes ``export`` lines (NCCL/network knobs).
    """

    job_name: str = "wurst"
    nodes: int = 1
    tasks_per_node: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int = 1
    time: str = "1:00:00"
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    mem: str | None = None
    constraint: str | None = None
    exclusive: bool = False
    signal_seconds: int | None = 120
    requeue_signal: str = "USR1"
    requeue: bool = True
    output: str = "slurm-%x-%j.out"
    error: str | None = None
    chdir: str | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    setup: Sequence[str] = ()
    srun_args: Sequence[str] = ()
    extra_sbatch: Sequence[str] = ()

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], **overrides: Any) -> SlurmJob:
        """Builds a job from a config mapping (e.g. ``cfg.slurm``), rejecting unknown keys by name."""
        merged = {**dict(values), **overrides}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(merged) - known)
        if unknown:
            raise SlurmConfigError(f"unknown SLURM setting(s) {unknown}; known settings: {sorted(known)}")
        merged["env"] = {str(k): str(v) for k, v in dict(merged.get("env") or {}).items()}
        for key in ("setup", "srun_args", "extra_sbatch"):
            merged[key] = tuple(str(v) for v in (merged.get(key) or ()))
        return cls(**merged)

    @property
    def total_tasks(self) -> int:
        return self.nodes * self.tasks_per_node


def parse_time_limit(value: str | int) -> int:
    """sbatch ``--time`` value -> seconds. Formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S."""
    text = str(value).strip()
    bad = SlurmConfigError(
        f'time={value!r} is not an sbatch time limit; use minutes ("90"), "H:MM:SS" or "D-HH:MM:SS"'
    )
    days, has_days = 0, "-" in text
    if has_days:
        day_text, text = text.split("-", 1)
        if not day_text.isdigit():
            raise bad
        days = int(day_text)
    parts = text.split(":")
    if not all(p.isdigit() for p in parts) or not 1 <= len(parts) <= 3:
        raise bad
    nums = [int(p) for p in parts]
    if has_days:  # D-H, D-H:M, D-H:M:S
        nums = nums + [0] * (3 - len(nums))
        hours, minutes, seconds = nums
    elif len(nums) == 1:
        hours, minutes, seconds = 0, nums[0], 0
    elif len(nums) == 2:
        hours, minutes, seconds = 0, nums[0], nums[1]
    else:
        hours, minutes, seconds = nums
    total = ((days * 24 + hours) * 60 + minutes) * 60 + seconds
    if total <= 0:
        raise SlurmConfigError(f"time={value!r} is zero; give the job a positive time limit")
    return total


def known_partitions() -> list[str]:
    """Partition names of the cluster SLURM_CONF points at (``sinfo -h -o %P``, default's ``*`` dropped)."""
    if shutil.which("sinfo") is None:
        raise SlurmConfigError(
            "cannot check the partition: `sinfo` is not installed here; "
            "submit from a node of the cluster, or set partition: null for the default"
        )
    proc = subprocess.run(
        ["sinfo", "-h", "-o", "%P"], check=False, capture_output=True, text=True, timeout=60
    )
    if proc.returncode != 0:
        raise SlurmConfigError(
            f"cannot list partitions: `sinfo -h -o %P` failed: {proc.stderr.strip()}; "
            "is the SLURM controller reachable (SLURM_CONF)?"
        )
    return sorted({line.strip().rstrip("*") for line in proc.stdout.splitlines() if line.strip()})


def validate(job: SlurmJob, partitions: Sequence[str] | None = None, check_partition: bool = True) -> None:
    """Raises ``SlurmConfigError`` for settings SLURM or Lightning would reject or run wrongly.

    ``partitions``: the cluster's partition names; ``None`` asks sinfo (only when ``job.partition`` is set
    and ``check_partition``).
    """
    if not _JOB_NAME_RE.match(job.job_name):
        raise SlurmConfigError(
            f"job_name={job.job_name!r}: use letters, digits and . _ + - only "
            "(squeue shows it; wurst names jobs wurst-<pipeline>-<stage>)"
        )
    for name in ("nodes", "tasks_per_node", "cpus_per_task"):
        value = getattr(job, name)
        if not isinstance(value, int) or value < 1:
            raise SlurmConfigError(f"{name}={value!r}: must be a whole number >= 1")
    if not isinstance(job.gpus_per_node, int) or job.gpus_per_node < 0:
        raise SlurmConfigError(
            f"gpus_per_node={job.gpus_per_node!r}: must be a whole number >= 0 (0 = CPU job)"
        )
    if job.gpus_per_node and job.gpus_per_node != job.tasks_per_node:
        raise SlurmConfigError(
            f"gpus_per_node={job.gpus_per_node} but tasks_per_node={job.tasks_per_node}: Lightning's SLURM "
            f"environment runs one task per GPU, so set tasks_per_node: {job.gpus_per_node} "
            f"(or gpus_per_node: {job.tasks_per_node})"
        )
    limit_s = parse_time_limit(job.time)
    if not _SIGNAL_RE.match(job.requeue_signal):
        raise SlurmConfigError(
            f"requeue_signal={job.requeue_signal!r}: use USR1 (Lightning's default) or USR2"
        )
    if job.requeue_signal.upper().startswith(("B:", "RB:")):
        raise SlurmConfigError(
            f"requeue_signal={job.requeue_signal!r} signals only the batch shell; the trainer "
            "runs under srun and must get it: drop the 'B:' prefix"
        )
    if job.signal_seconds is not None:
        if not isinstance(job.signal_seconds, int) or not 0 < job.signal_seconds <= 65535:
            raise SlurmConfigError(
                f"signal_seconds={job.signal_seconds!r}: must be 1..65535 seconds (or null)"
            )
        if job.signal_seconds + SLURMCTLD_CHECK_PERIOD_S >= limit_s:
            raise SlurmConfigError(
                f"signal_seconds={job.signal_seconds} with time={job.time!r} ({limit_s} s): slurmctld "
                f"sends the warning when at most signal_seconds + {SLURMCTLD_CHECK_PERIOD_S} s remain, i.e. "
                "right at the start; lengthen time or shorten signal_seconds"
            )
    for key in job.env:
        if not _ENV_NAME_RE.match(key):
            raise SlurmConfigError(f"env key {key!r} is not a valid environment variable name")
    if job.partition is not None and check_partition:
        names = list(partitions) if partitions is not None else known_partitions()
        if job.partition not in names:
            raise SlurmConfigError(
                f"partition={job.partition!r} does not exist on this cluster; "
                f"known partitions: {', '.join(names) or '(none)'}"
            )


def sbatch_directives(job: SlurmJob) -> list[str]:
    """The ``#SBATCH`` lines for ``job`` (no validation)."""
    lines = [
        f"--job-name={job.job_name}",
        f"--nodes={job.nodes}",
        f"--ntasks-per-node={job.tasks_per_node}",
        f"--cpus-per-task={job.cpus_per_task}",
        f"--time={job.time}",
    ]
    if job.gpus_per_node:
        lines.append(f"--gpus-per-node={job.gpus_per_node}")
    for flag, value in (
        ("partition", job.partition),
        ("account", job.account),
        ("qos", job.qos),
        ("mem", job.mem),
        ("constraint", job.constraint),
        ("chdir", job.chdir),
    ):
        if value is not None:
            lines.append(f"--{flag}={value}")
    if job.exclusive:
        lines.append("--exclusive")
    if job.signal_seconds is not None:
        lines.append(f"--signal={job.requeue_signal}@{job.signal_seconds}")
    lines.append("--requeue" if job.requeue else "--no-requeue")
    # A requeued job writes to the same log: append rather than truncate the first run's output.
    lines.append("--open-mode=append")
    lines.append(f"--output={job.output}")
    if job.error is not None:
        lines.append(f"--error={job.error}")
    lines.extend(job.extra_sbatch)
    return [f"#SBATCH {shlex.quote(line) if ' ' in line else line}" for line in lines]


def render_sbatch(job: SlurmJob, command: str | Sequence[str]) -> str:
    """The sbatch script for ``job`` running ``command`` once per task under srun.

    ``command``: an argv list (quoted for the shell) or a shell string, e.g.
    ``["wurst-train", "experiment=paper_v2/stage_c_p1"]``.
    """
    argv = command if isinstance(command, str) else shlex.join(str(a) for a in command)
    if not argv.strip():
        raise SlurmConfigError("command is empty: give the program srun should launch, e.g. wurst-train ...")
    srun = [
        "srun",
        "--kill-on-bad-exit=1",
        f"--ntasks-per-node={job.tasks_per_node}",
        # Slurm 22.05 no longer passes the job's --cpus-per-task on to srun; say it again.
        f"--cpus-per-task={job.cpus_per_task}",
        *job.srun_args,
    ]
    body = [
        "#!/bin/bash",
        f"# {job.job_name}: rendered by slurm/template.py; submit with `python -m wurst.slurm submit` or `sbatch`.",
        *sbatch_directives(job),
        "",
        "set -eo pipefail",
        'echo "[$(date -Is)] job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST"',
    ]
    body += [
        "# A rendezvous left in the submitting shell (torchrun, an earlier Lightning run) must not reach the",
        "# tasks: each job takes its own from SLURM (an inherited MASTER_PORT made concurrent jobs collide).",
        f"unset {' '.join(INHERITED_RENDEZVOUS)}",
    ]
    if job.env:
        body.append("# Environment for every task (NCCL / network knobs).")
        body.extend(f"export {key}={shlex.quote(str(value))}" for key, value in job.env.items())
    body.extend(job.setup)
    body += [
        "# One task per device; Lightning's SLURMEnvironment takes rank, world size and the",
        "# rendezvous host (first node of SLURM_NODELIST) from what srun sets.",
        f"{shlex.join(srun)} {argv}",
        "",
    ]
    return "\n".join(body)
