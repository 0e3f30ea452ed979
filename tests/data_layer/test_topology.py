"""Where a process sits: rank, world size and local rank, read once (wurst.data.topology) for the data,
the training and the evaluation, under torchrun's and srun's environments alike."""

from __future__ import annotations

import pytest

from wurst.data.topology import launched_by, local_rank, rank_and_world_size

LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS",
                 "SLURM_LOCALID", "SLURM_NODELIST", "SLURM_JOB_ID")


@pytest.fixture
def clean_env(monkeypatch):
    for var in LAUNCHER_VARS:
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_srun_tasks_are_placed_by_slurms_variables(clean_env):
    clean_env.setenv("SLURM_PROCID", "3")
    clean_env.setenv("SLURM_NTASKS", "4")
    clean_env.setenv("SLURM_LOCALID", "1")
    assert (rank_and_world_size(), local_rank(), launched_by()) == ((3, 4), 1, "slurm")


def test_torchruns_variables_come_before_slurms(clean_env):
    for var, value in {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "SLURM_PROCID": "0", "SLURM_NTASKS": "1",
                       "SLURM_LOCALID": "5"}.items():
        clean_env.setenv(var, value)
    assert (rank_and_world_size(), local_rank(), launched_by()) == ((1, 2), 0, "torchrun")


def test_a_lone_process_is_rank_0_of_1(clean_env):
    assert (rank_and_world_size(), local_rank(), launched_by()) == ((0, 1), 0, None)


def test_a_broken_local_rank_is_named(clean_env):
    clean_env.setenv("SLURM_LOCALID", "x")
    with pytest.raises(ValueError, match="SLURM_LOCALID='x' must be an integer"):
        local_rank()


def test_evaluation_meets_under_srun_where_lightning_puts_ddps_rendezvous(clean_env):
    from wurst.eval.evaluate import rendezvous

    for var, value in {"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_NODELIST": "n[1-2]",
                       "SLURM_JOB_ID": "4321"}.items():
        clean_env.setenv(var, value)
    assert rendezvous() == "tcp://n1:19321"  # Lightning's SLURMEnvironment: first node, 15000 + job id's last 4
    clean_env.setenv("MASTER_PORT", "29500")
    clean_env.setenv("MASTER_ADDR", "10.0.0.7")
    assert rendezvous() == "env://"
