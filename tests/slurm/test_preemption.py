"""Preemption and time limits: checkpoint at a step boundary, requeue, resume from the checkpoint (not
step 0), finish; the carbon ledger continues across the restart."""

from __future__ import annotations

import os
import signal
import subprocess

import lightning.pytorch as pl
import pytest
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment

from wurst.slurm.preemption import (
    CheckpointOnTerminate,
    next_hpc_checkpoint,
    requeue_job_id,
    requeue_signal,
    slurm_environment,
    slurm_plugins,
)

from .conftest import (
    DDP_STEPS,
    SIGNAL_SECONDS,
    TIME_LIMIT,
    TIME_LIMIT_STEPS,
    TINY_C_GLOBAL_BATCH,
)


def test_requeue_signal_names_match_sbatch_signal_names():
    assert requeue_signal("USR1") is requeue_signal("SIGUSR1") is requeue_signal(10) is signal.SIGUSR1
    with pytest.raises(ValueError, match="requeue_signal='USR3' is not a signal name"):
        requeue_signal("USR3")


def test_inside_slurm_the_trainer_gets_lightnings_auto_requeue_environment(monkeypatch):
    # What srun sets for a 2-task job (Lightning refuses --ntasks without --ntasks-per-node).
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "2")
    monkeypatch.setenv("SLURM_JOB_NAME", "wurst-tiny-stage_c")
    [env] = slurm_plugins("USR1")
    assert isinstance(env, SLURMEnvironment)
    assert env.auto_requeue and env.requeue_signal == signal.SIGUSR1


def test_outside_slurm_no_cluster_plugin_is_added(monkeypatch):
    for key in ("SLURM_NTASKS", "SLURM_JOB_NAME"):
        monkeypatch.delenv(key, raising=False)
    assert slurm_plugins() == []


def test_hpc_checkpoints_are_numbered_after_the_highest(tmp_path):
    assert next_hpc_checkpoint(tmp_path).name == "hpc_ckpt_1.ckpt"
    for n in (1, 3):
        (tmp_path / f"hpc_ckpt_{n}.ckpt").touch()
    assert next_hpc_checkpoint(tmp_path) == tmp_path / "hpc_ckpt_4.ckpt"


def test_array_tasks_are_requeued_by_array_and_task_id():
    assert (
        requeue_job_id({"SLURM_JOB_ID": "17", "SLURM_ARRAY_JOB_ID": "16", "SLURM_ARRAY_TASK_ID": "1"})
        == "16_1"
    )
    assert requeue_job_id({"SLURM_JOB_ID": "17"}) == "17"
    with pytest.raises(RuntimeError, match="SLURM_JOB_ID is not set"):
        requeue_job_id({})


# -- one process: the signal handlers and the step boundary ----------------------------------------------


class SignalAtStep(pl.LightningModule):
    """Sends ``signum`` to this process during one training step, as SLURM would."""

    def __init__(self, signum: int, at_step: int):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        self.signum, self.at_step = signum, at_step

    def training_step(self, batch, batch_idx):
        if self.global_step == self.at_step:
            os.kill(os.getpid(), self.signum)
        return self.layer(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class SignalFromWorker(torch.utils.data.IterableDataset):
    """A DataLoader worker that receives the requeue signal itself (SLURM signals every process)."""

    def __iter__(self):
        os.kill(os.getpid(), signal.SIGUSR1)
        for _ in range(64):
            yield (torch.randn(2),)


def fit(tmp_path, module, loader, callback, plugins=(), max_steps=12):
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        default_root_dir=str(tmp_path),
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[callback],
        plugins=list(plugins),
    )
    trainer.fit(module, loader)
    return trainer


def tensor_loader():
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(64, 2)), batch_size=4)


@pytest.fixture
def fake_slurm_job(monkeypatch, tmp_path):
    """The environment srun gives a one-task job; SLURM_CONF is an empty file, so scontrol fails at once."""
    (tmp_path / "empty-slurm.conf").touch()
    for key, value in {
        "SLURM_NTASKS": "1",
        "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_JOB_NAME": "wurst-unit",
        "SLURM_JOB_ID": "4242",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
        "SLURM_NODELIST": "localhost",
        "SLURM_CONF": str(tmp_path / "empty-slurm.conf"),
    }.items():
        monkeypatch.setenv(key, value)
    for key in ("SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(key, raising=False)


def test_sigterm_stops_training_at_the_step_boundary_with_a_checkpoint(tmp_path):
    callback = CheckpointOnTerminate()
    with pytest.raises(SystemExit):
        fit(tmp_path, SignalAtStep(signal.SIGTERM, at_step=5), tensor_loader(), callback)
    saved = torch.load(tmp_path / "hpc_ckpt_1.ckpt", weights_only=True)
    assert saved["global_step"] == 6 and callback.saved == tmp_path / "hpc_ckpt_1.ckpt"  # step 5 completed


def test_requeue_signal_checkpoints_at_the_next_step_boundary_and_training_goes_on(tmp_path, fake_slurm_job):
    callback = CheckpointOnTerminate()
    trainer = fit(
        tmp_path,
        SignalAtStep(signal.SIGUSR1, at_step=3),
        tensor_loader(),
        callback,
        plugins=[slurm_environment("USR1")],
    )
    assert trainer.global_step == 12 and callback.requeued  # the requeue's SIGTERM would stop it
    assert torch.load(tmp_path / "hpc_ckpt_1.ckpt", weights_only=True)["global_step"] == 4
    assert signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, None)  # fit over: handler gone


def test_a_dataloader_workers_copy_of_the_requeue_handler_does_nothing(tmp_path, fake_slurm_job):
    # Lightning's handler, inherited by the forked worker, would checkpoint the worker's stale model copy.
    loader = torch.utils.data.DataLoader(SignalFromWorker(), batch_size=4, num_workers=1)
    callback = CheckpointOnTerminate()
    trainer = fit(
        tmp_path,
        SignalAtStep(signal.SIGUSR1, at_step=-1),
        loader,
        callback,
        plugins=[slurm_environment("USR1")],
        max_steps=6,
    )
    assert trainer.global_step == 6 and not callback.requeued
    assert not list(tmp_path.glob("hpc_ckpt_*.ckpt"))


# -- on the loopback cluster -------------------------------------------------------------------------


def srun_line(run) -> str:
    [line] = [line for line in run.script.read_text().splitlines() if line.startswith("srun ")]
    return line.replace(str(run.output_dir), "<output_dir>")


def test_requeued_job_runs_the_ddp_jobs_command(requeue_run, ddp_run):
    assert srun_line(requeue_run) == srun_line(ddp_run)
    assert "#SBATCH --requeue" in requeue_run.script.read_text().splitlines()


@pytest.mark.slow
def test_scontrol_requeue_mid_run_resumes_from_the_checkpoint_and_the_ledger_continues(requeue_run, ddp_run):
    requeue_run.extra["requeuer"].join(timeout=450)
    assert requeue_run.extra.get("requeued_at") == 4, requeue_run.extra.get("requeued_at")
    status = requeue_run.wait(420)
    log = requeue_run.log.read_text()
    assert status.state == "COMPLETED" and status.restarts == "1", log[-3000:]
    for rank in (0, 1):
        first, second = requeue_run.events(rank, "start")
        assert (first["restart"], first["step"]) == (0, 0)
        assert second["restart"] == 1 and second["step"] >= 4  # resumed, not from step 0
    # On SIGTERM both ranks stopped at the same step boundary and wrote hpc_ckpt_1 together; the
    # requeued run resumed from it.
    resumed_step = requeue_run.events(0, "start")[1]["step"]
    hpc = requeue_run.run_dir / "hpc_ckpt_1.ckpt"
    assert torch.load(hpc, map_location="cpu", weights_only=True)["global_step"] == resumed_step
    assert f"resuming from {hpc}" in log
    accounting = requeue_run.provenance()["accounting"]
    assert accounting["segments"] == 2 and accounting["steps"] == DDP_STEPS  # the ledger carried on
    assert requeue_run.provenance()["samples_seen"] == DDP_STEPS * TINY_C_GLOBAL_BATCH
    # The data position and the per-step seeds came back too: the same weights as the uninterrupted job.
    assert ddp_run.wait(420).state == "COMPLETED"
    ends = [run.events(rank, "end")[-1]["export_sha256"] for run in (requeue_run, ddp_run) for rank in (0, 1)]
    assert len(set(ends)) == 1


def test_time_limited_job_is_submitted_with_a_warning_signal_and_requeue(time_limited_run):
    shown = subprocess.run(
        ["scontrol", "show", "job", time_limited_run.job_id], capture_output=True, text=True, check=True
    ).stdout
    assert "Requeue=1" in shown and f"TimeLimit=00:0{TIME_LIMIT}:00" in shown
    assert f"#SBATCH --signal=USR1@{SIGNAL_SECONDS}" in time_limited_run.script.read_text().splitlines()


@pytest.mark.slow
def test_time_limited_job_checkpoints_requeues_itself_resumes_and_finishes(time_limited_run):
    run = time_limited_run
    status = run.wait(480)
    log = run.log.read_text()
    assert status.state == "COMPLETED" and int(status.restarts) >= 1, log[-3000:]
    assert "requeue signal at step" in log and f"requeueing SLURM job {run.job_id}" in log
    first, second = run.events(0, "start")[:2]
    assert (first["restart"], first["step"]) == (0, 0) and second["restart"] == 1
    assert 0 < second["step"] < TIME_LIMIT_STEPS  # resumed mid-run from a checkpoint ...
    hpc = torch.load(run.run_dir / "hpc_ckpt_1.ckpt", map_location="cpu", weights_only=True)
    assert 0 < hpc["global_step"] <= second["step"]  # ... the warning's, or a periodic one written after it
    provenance = run.provenance()
    assert provenance["steps"] == TIME_LIMIT_STEPS and provenance["accounting"]["segments"] >= 2
