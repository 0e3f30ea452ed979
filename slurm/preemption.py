"""Preemption and time limits for a Lightning Trainer under SLURM: checkpoint, requeue, resume.

Two ways a job is stopped early, and what happens (facts from Lightning 2.6's
``trainer/connectors/signal_connector.py`` and ``checkpoint_connector.py``, and slurmctld):

1. Time limit. The job is submitted with ``--signal=USR1@<s> --requeue`` (``slurm.template``).
   slurmctld checks limits every 30 s and sends SIGUSR1 to every srun task once at most
   ``s + 30`` seconds remain. With ``SLURMEnvironment(auto_requeue=True, requeue_signal=SIGUSR1)``
   in the Trainer's plugins, Lightning's handler then, on every rank, writes
   ``<default_root_dir>/hpc_ckpt_<n>.ckpt`` with ``trainer.save_checkpoint`` and, on global rank 0,
   runs ``scontrol requeue $SLURM_JOB_ID`` (``<array>_<task>`` for array jobs). SLURM kills the
   job (SIGTERM, then SIGKILL after KillWait) and queues it again under the same job id.
2. ``scontrol requeue <id>`` by an operator, or preemption with ``PreemptMode=REQUEUE``: SIGTERM
   (then SIGKILL after KillWait); the job is already back in the queue. Lightning only notes the
   SIGTERM and stops at the next step boundary with ``SIGTERMException`` (on every rank: rank 0's
   flag is broadcast each step); ``CheckpointOnTerminate`` below writes a checkpoint then.

On restart (``SLURM_RESTART_COUNT`` ≥ 1) the same command runs again: ``trainer.fit(ckpt_path=None)``
under SLURM resumes from the highest-numbered ``hpc_ckpt_<n>.ckpt`` in ``default_root_dir``; the
wurst trainer instead passes the newest valid checkpoint of ``run_dir`` and ``run_dir/checkpoints``
(``resume=auto``), which also covers a SIGKILL that left only the periodic checkpoint. Callback state
(the carbon ledger, the data-stream position) comes back with the checkpoint, so accounting continues.

How the wurst trainer is configured (the lead's side)::

    trainer = L.Trainer(..., default_root_dir=run_dir,
                        plugins=[*slurm_plugins(), AtomicCheckpointIO()],
                        callbacks=[*callbacks, CheckpointOnTerminate()])
    trainer.fit(module, loader, ckpt_path=<newest checkpoint of run_dir, run_dir/checkpoints or None>)

Caveat: Lightning installs its handlers inside ``trainer.fit``; a SIGUSR1 that arrives before (slow
start-up, tiny time limit) kills the task, as SIGUSR1's default action is to terminate. Keep
``signal_seconds + 30`` well under the time limit minus start-up time.
"""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import lightning.pytorch as pl
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info


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


class CheckpointOnTerminate(pl.Callback):
    """Writes ``hpc_ckpt_<n+1>.ckpt`` in ``default_root_dir`` when the fit loop stops on SIGTERM.

    SIGTERM is what ``scontrol requeue``, preemption and the time limit send (KillWait seconds before
    SIGKILL: the checkpoint must fit in that grace time, so pair this with periodic checkpoints). Lightning
    raises ``SIGTERMException`` on every rank at the same step boundary, so the collective
    ``trainer.save_checkpoint`` is safe here. Other exceptions are left alone: a crashed state is not
    worth resuming from.
    """

    def __init__(self) -> None:
        self.saved: Path | None = None

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        # Rank 0 names the file for all: save_checkpoint is collective and every rank must pass the same path.
        path = Path(trainer.strategy.broadcast(str(next_hpc_checkpoint(trainer.default_root_dir)), src=0))
        trainer.save_checkpoint(path)
        self.saved = path
        rank_zero_info(
            f"SIGTERM at step {trainer.global_step}: saved {path} for the requeued run to resume from"
        )
