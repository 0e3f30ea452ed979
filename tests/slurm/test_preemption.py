"""Preemption and time limits: checkpoint, requeue, resume from the checkpoint (not step 0), finish."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment

from slurm.preemption import CheckpointOnTerminate, next_hpc_checkpoint, requeue_signal, slurm_plugins
from slurm.submit import job_status, submit


def starts(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "starts.jsonl").read_text().splitlines()]


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


class SigtermAtStep(pl.LightningModule):
    """Sends itself SIGTERM at one step, as `scontrol requeue` would."""

    def __init__(self, at_step: int):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        self.at_step = at_step

    def training_step(self, batch, batch_idx):
        if self.global_step == self.at_step:
            os.kill(os.getpid(), signal.SIGTERM)
        return self.layer(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_sigterm_stops_training_with_a_checkpoint_to_resume_from(tmp_path):
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(64, 2)), batch_size=4)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=12,
        default_root_dir=str(tmp_path),
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[CheckpointOnTerminate()],
    )
    with pytest.raises(SystemExit):
        trainer.fit(SigtermAtStep(at_step=5), loader)
    saved = torch.load(tmp_path / "hpc_ckpt_1.ckpt", weights_only=True)
    assert saved["global_step"] == 6  # the step that got the signal still completed


@pytest.mark.slow
def test_scontrol_requeue_mid_run_resumes_from_the_checkpoint_and_the_ledger_continues(
    cluster, tmp_path, make_job, lightning_job_command, wait_job
):
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    job = make_job("wurst-test-requeue", log, time="10", signal_seconds=None)
    command = lightning_job_command(
        run_dir, max_steps=60, step_seconds=0.5, step_seconds_after_restart=0.05, ckpt_every=5, batch_size=4
    )
    job_id = submit(job, command, tmp_path / "job.sbatch")
    deadline = time.monotonic() + 120
    while not (run_dir / "checkpoints" / "step-step=10.ckpt").exists():  # 10 steps in, 2 periodic checkpoints
        assert time.monotonic() < deadline, (
            f"no checkpoint after 120 s:\n{log.read_text() if log.exists() else ''}"
        )
        assert not job_status(job_id).finished, log.read_text()
        time.sleep(0.5)
    subprocess.run(["scontrol", "requeue", job_id], check=True)

    status = wait_job(job_id, 180, log)
    assert status.state == "COMPLETED" and status.restarts == "1", log.read_text()
    first, second = starts(run_dir)
    assert (first["restart"], first["start_step"]) == (0, 0)
    assert second["restart"] == 1 and second["start_step"] >= 10  # resumed, not from step 0
    assert Path(second["resumed_from"]).name.startswith("hpc_ckpt_")  # the checkpoint written on SIGTERM
    assert (
        second["samples_seen"] == 4 * second["start_step"] and second["segments"] == 2
    )  # the ledger carried on
    final = json.loads((run_dir / "final-rank0.json").read_text())
    assert final["global_step"] == 60 and final["samples_seen"] == 4 * 60 and final["segments"] == 2


def test_time_limited_job_is_submitted_with_a_warning_signal_and_requeue(time_limited_run):
    shown = subprocess.run(
        ["scontrol", "show", "job", time_limited_run.job_id], capture_output=True, text=True, check=True
    ).stdout
    assert "Requeue=1" in shown and "TimeLimit=00:03:00" in shown
    assert "#SBATCH --signal=USR1@90" in time_limited_run.script.read_text().splitlines()


@pytest.mark.slow
def test_time_limited_job_checkpoints_requeues_itself_resumes_and_finishes(time_limited_run, wait_job):
    run = time_limited_run
    status = wait_job(run.job_id, 330, run.log)
    log = run.log.read_text()
    assert status.state == "COMPLETED" and int(status.restarts) >= 1, log
    assert "Handling auto-requeue signal: 10" in log  # Lightning's SIGUSR1 handler ...
    assert f"Requeued SLURM job: {run.job_id}" in log  # ... requeued the job itself
    first, second = starts(run.run_dir)[:2]
    assert first["start_step"] == 0 and second["restart"] == 1
    assert 0 < second["start_step"] < 200  # resumed mid-run from the checkpoint
    assert (run.run_dir / "hpc_ckpt_1.ckpt").exists()  # written by the SIGUSR1 handler
    final = json.loads((run.run_dir / "final-rank0.json").read_text())
    assert final["global_step"] == 200 and final["samples_seen"] == 4 * 200
