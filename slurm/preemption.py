"""Preemption and time limits for a Lightning Trainer under SLURM: checkpoint, requeue, resume.

Two ways a job is stopped early (facts from slurmctld and Lightning 2.6's
``trainer/connectors/signal_connector.py``):

1. Time limit. The job is submitted with ``--signal=USR1@<s> --requeue`` (``slurm.template``).
   slurmctld checks limits every 30 s and sends SIGUSR1 to every srun task once at most ``s + 30``
   seconds remain. The job should checkpoint, ``scontrol requeue`` itself and stop.
2. ``scontrol requeue <id>`` by an operator, preemption with ``PreemptMode=REQUEUE``, or the limit
   itself: SIGTERM to every task, SIGKILL ``KillWait`` seconds later; the job is already back in the
   queue. The job should checkpoint and stop within that grace time.

Lightning reacts to both *inside the signal handler*: its SIGUSR1 handler calls
``trainer.save_checkpoint`` and its SIGTERM handler ``torch.distributed.broadcast``. Both are
collectives, and a handler runs wherever the interrupted rank happened to be: in DDP one rank's
handler meets the other rank's gradient all-reduce. We saw it on the loopback cluster: under
``scontrol requeue`` a two-node Stage C job hung in the handler until SIGKILL, wrote no checkpoint and
lost the steps since the last periodic one. ``CheckpointOnTerminate`` therefore installs handlers
that only note the signal (the requeue signal's at fit start, so Lightning does not install its own;
SIGTERM's when training starts, replacing Lightning's); at the next optimizer-step boundary, where
every rank is at the same place, the ranks agree (an all-reduce of the flags: a signal on any rank
counts) and then, together:

- requeue signal: save ``<default_root_dir>/hpc_ckpt_<n>.ckpt``; global rank 0 runs
  ``scontrol requeue $SLURM_JOB_ID`` (``<array>_<task>`` for array jobs, e.g. submitit sweeps);
  training goes on until the SIGTERM that the requeue brings;
- SIGTERM: Lightning's stop flag is set on every rank, the fit loop raises ``SIGTERMException`` at the
  end of that step, and ``on_exception`` saves ``hpc_ckpt_<n+1>.ckpt`` (skipped if this step is saved).

On restart (``SLURM_RESTART_COUNT`` ≥ 1) the same command runs again; the wurst trainer resumes from
the newest valid checkpoint of ``run_dir`` (hpc_ckpt_*) and ``run_dir/checkpoints`` (``resume=auto``),
which also covers a SIGKILL that left only the periodic checkpoint. Callback state (the carbon ledger,
the data-stream position) comes back with the checkpoint, so accounting and the data stream continue.

How the wurst trainer is configured (train/run_stage.py)::

    trainer = L.Trainer(..., default_root_dir=run_dir,
                        plugins=[*slurm_plugins(), AtomicCheckpointIO()],
                        callbacks=[*callbacks, CheckpointOnTerminate()])
    trainer.fit(module, datamodule, ckpt_path=<newest checkpoint of run_dir, run_dir/checkpoints or None>)

Caveats: a SIGUSR1 before ``trainer.fit`` starts (slow start-up, tiny time limit) kills the task,
SIGUSR1's default action: keep ``signal_seconds + 30`` well under the time limit minus start-up time.
A step that takes longer than ``KillWait`` cannot be checkpointed on SIGTERM: the periodic checkpoint
is the fallback. SLURM signals every process of the step, DataLoader workers included, and a torch
worker dies of a SIGTERM that its parent did not send; the training process then fails with
"DataLoader worker ... killed by signal: Terminated" before the step boundary, so with
``data.num_workers > 0`` a ``scontrol requeue`` resumes from the last periodic checkpoint (the requeue
signal path is unaffected: its checkpoint is written before SLURM sends SIGTERM). The fix belongs to
the data loader: workers drop a SIGTERM that their parent did not send and exit on one it did, or
when it dies (``data.stream_loader.stop_only_for_parent``), so they outlive SLURM's signal yet never
keep an erroring training process waiting at exit.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info

log = logging.getLogger(__name__)


def requeue_signal(name: str | int = "USR1") -> signal.Signals:
    """``"USR1"``, ``"SIGUSR1"`` or ``10`` -> ``signal.SIGUSR1`` (as in ``--signal=<name>@<s>``)."""
    if isinstance(name, int):
        return signal.Signals(name)
    key = str(name).upper()
    key = key if key.startswith("SIG") else f"SIG{key}"
    try:
        return signal.Signals[key]
    except KeyError:
        raise ValueError(
            f"requeue_signal={name!r} is not a signal name; use USR1 (Lightning's default) or USR2"
        ) from None


def slurm_environment(signal_name: str | int = "USR1", auto_requeue: bool = True) -> SLURMEnvironment:
    """Lightning's SLURM cluster environment with requeue-on-signal (``requeue_signal`` must match the
    ``--signal=<name>@<s>`` the job was submitted with)."""
    return SLURMEnvironment(auto_requeue=auto_requeue, requeue_signal=requeue_signal(signal_name))


def slurm_plugins(signal_name: str | int = "USR1") -> list[SLURMEnvironment]:
    """``[slurm_environment()]`` inside an sbatch/srun job, ``[]`` elsewhere (laptop, basic launcher)."""
    return [slurm_environment(signal_name)] if SLURMEnvironment.detect() else []


def next_hpc_checkpoint(folder: str | os.PathLike) -> Path:
    """``folder/hpc_ckpt_<n+1>.ckpt`` after the highest existing one: the name Lightning resumes from."""
    folder = Path(folder)
    numbers = [
        int(m.group(1))
        for p in folder.glob("hpc_ckpt_*.ckpt")
        if (m := re.fullmatch(r"hpc_ckpt_(\d+)\.ckpt", p.name))
    ]
    return folder / f"hpc_ckpt_{max(numbers, default=0) + 1}.ckpt"


def requeue_job_id(environ: dict[str, str] | None = None) -> str:
    """The id ``scontrol requeue`` takes for this job: ``<array job>_<task>`` in an array, else the job id."""
    env = os.environ if environ is None else environ
    if env.get("SLURM_ARRAY_JOB_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    if not env.get("SLURM_JOB_ID"):
        raise RuntimeError("cannot requeue: SLURM_JOB_ID is not set (this process is not a SLURM job)")
    return env["SLURM_JOB_ID"]


class CheckpointOnTerminate(pl.Callback):
    """Checkpoints (and requeues) on SLURM's signals at a step boundary all ranks share; see the module doc.

    SIGTERM (``scontrol requeue``, preemption, the time limit): stop at the end of the current optimizer
    step with ``hpc_ckpt_<n+1>.ckpt`` in ``default_root_dir``; the checkpoint must fit in SLURM's KillWait
    grace time, so pair this with periodic checkpoints. The requeue signal of Lightning's auto-requeue
    ``SLURMEnvironment`` (``slurm_plugins()``): save ``hpc_ckpt_<n+1>.ckpt``, requeue the job from global
    rank 0, keep training until the requeue's SIGTERM. Exceptions other than ``SIGTERMException`` are left
    alone: a crashed state is not worth resuming from.

    ``saved``: the last checkpoint written here; ``requeued``: whether this run asked SLURM to requeue it.
    """

    def __init__(self) -> None:
        self.saved: Path | None = None
        self.requeued = False
        self._saved_step = -1
        # Set by the signal handlers (this rank only); read at step boundaries.
        self._terminate = False
        self._requeue = False
        self._launcher_told = False
        self._trainer: pl.Trainer | None = None
        self._requeue_signum: signal.Signals | None = None
        self._handler_before_fit: Any = None

    # -- signal handlers: note the signal, nothing else (no collectives, no I/O) ------------------
    # DataLoader workers forked during fit inherit these Python handlers; in a worker they only set the
    # worker's own copy of the flag. (Lightning's inherited handler would save a checkpoint from the
    # worker's stale copy of the model and requeue the job.)
    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        self._terminate = True
        launcher = self._trainer.strategy.launcher if self._trainer is not None else None
        if launcher is not None and not self._launcher_told:
            # Lightning's own handler forwards SIGTERM to the processes its launcher started; so do we.
            self._launcher_told = True
            launcher.kill(signum)

    def _on_requeue_signal(self, signum: int, frame: FrameType | None) -> None:
        self._requeue = True

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._trainer = trainer
        environment = _cluster_environment(trainer)
        if not (isinstance(environment, SLURMEnvironment) and environment.auto_requeue):
            return
        if threading.current_thread() is not threading.main_thread():
            return  # handlers can only be set from the main thread; Lightning's stay in place
        # Installed before Lightning registers its handlers (Trainer._run, after on_fit_start): Lightning
        # then keeps ours for the requeue signal instead of installing its checkpoint-in-the-handler one,
        # and the DataLoader workers it forks next inherit ours.
        self._requeue_signum = environment.requeue_signal or signal.SIGUSR1
        self._handler_before_fit = signal.getsignal(self._requeue_signum)
        signal.signal(self._requeue_signum, self._on_requeue_signal)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._trainer = trainer
        if threading.current_thread() is not threading.main_thread():
            return
        # Lightning wraps any SIGTERM handler it finds into its own (which broadcasts), so SIGTERM is
        # replaced now, after its registration; its signal connector restores the pre-fit handler at teardown.
        signal.signal(signal.SIGTERM, self._on_sigterm)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._requeue_signum is not None and threading.current_thread() is threading.main_thread():
            previous = self._handler_before_fit
            signal.signal(self._requeue_signum, signal.SIG_DFL if previous is None else previous)
            self._requeue_signum = None

    # -- step boundary: agree, then act together -----------------------------------------------
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if (batch_idx + 1) % max(1, int(trainer.accumulate_grad_batches)) != 0:
            return  # mid-accumulation: the checkpoint would drop the partial gradient
        terminate, requeue = self._agree(trainer)
        if requeue and not self.requeued:
            self._save(trainer, "requeue signal")
            self.requeued = True
            if trainer.is_global_zero:
                _scontrol_requeue()
        if terminate:
            rank_zero_info(f"SIGTERM: stopping after step {trainer.global_step} with a checkpoint")
            # Lightning's stop flag, on every rank at once: the fit loop raises SIGTERMException at the end of
            # this step everywhere (on_advance_end), and on_exception below writes the checkpoint.
            connector = getattr(trainer, "_signal_connector", None)
            if connector is None or not hasattr(connector, "received_sigterm"):
                raise RuntimeError(
                    "CheckpointOnTerminate: this Lightning version has no trainer._signal_connector."
                    "received_sigterm; update slurm/preemption.py for it (stopping on SIGTERM depends on it)"
                )
            connector.received_sigterm = True

    def _agree(self, trainer: pl.Trainer) -> tuple[bool, bool]:
        """(terminate, requeue): whether any rank got SIGTERM / the requeue signal (a collective in DDP)."""
        flags = [float(self._terminate), float(self._requeue)]
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            tensor = torch.tensor(flags, device=trainer.strategy.root_device)
            torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
            flags = tensor.tolist()
        return bool(flags[0]), bool(flags[1])

    def _save(self, trainer: pl.Trainer, why: str) -> None:
        if trainer.global_step == self._saved_step:
            return
        # Rank 0 names the file for all: save_checkpoint is collective and every rank must pass the same path.
        path = Path(trainer.strategy.broadcast(str(next_hpc_checkpoint(trainer.default_root_dir)), src=0))
        trainer.save_checkpoint(path)
        self.saved, self._saved_step = path, trainer.global_step
        rank_zero_info(
            f"{why} at step {trainer.global_step}: saved {path} for the requeued run to resume from"
        )

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if isinstance(exception, SIGTERMException):
            self._save(trainer, "SIGTERM")


def _cluster_environment(trainer: pl.Trainer) -> Any:
    """The trainer's cluster environment (a DDP strategy has it; a single-device one only the connector)."""
    environment = getattr(trainer.strategy, "cluster_environment", None)
    if environment is None:
        environment = getattr(getattr(trainer, "_accelerator_connector", None), "cluster_environment", None)
    return environment


def _scontrol_requeue() -> None:
    job_id = requeue_job_id()
    # Said before the call: the requeue's SIGTERM may end this process before scontrol returns.
    log.info("requeueing SLURM job %s (scontrol requeue)", job_id)
    try:
        proc = subprocess.run(
            ["scontrol", "requeue", job_id], check=False, capture_output=True, text=True, timeout=120
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        log.warning("cannot run `scontrol requeue %s` (%s); the job will end at its time limit", job_id, err)
        return
    if proc.returncode == 0:
        log.info("requeued SLURM job %s", job_id)
    else:
        log.warning(
            "`scontrol requeue %s` failed (exit %s): %s; the job will end at its time limit",
            job_id,
            proc.returncode,
            proc.stderr.strip(),
        )
