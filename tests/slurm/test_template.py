"""The sbatch template: what it renders, and the bad settings it stops before submission."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from wurst.slurm.submit import chain_steps_from_spec
from wurst.slurm.template import SlurmConfigError, SlurmJob, parse_time_limit, render_sbatch, validate

REPO = Path(__file__).resolve().parents[2]


def gpu_job(**settings) -> SlurmJob:
    base = {
        "job_name": "wurst-paper_v2-stage_c_p1",
        "nodes": 4,
        "tasks_per_node": 8,
        "gpus_per_node": 8,
        "cpus_per_task": 10,
        "time": "48:00:00",
        "partition": "a100",
        "account": "proj42",
        "signal_seconds": 300,
        "output": "logs/%x-%j.out",
        "error": "logs/%x-%j.err",
        "env": {"NCCL_SOCKET_IFNAME": "ib0"},
    }
    return SlurmJob.from_mapping({**base, **settings})


def test_rendered_script_asks_for_the_configured_resources():
    script = render_sbatch(gpu_job(), ["wurst-train", "experiment=paper_v2/stage_c_p1"])
    for line in [
        "#SBATCH --job-name=wurst-paper_v2-stage_c_p1",
        "#SBATCH --nodes=4",
        "#SBATCH --ntasks-per-node=8",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --cpus-per-task=10",
        "#SBATCH --time=48:00:00",
        "#SBATCH --partition=a100",
        "#SBATCH --account=proj42",
        "#SBATCH --output=logs/%x-%j.out",
        "#SBATCH --error=logs/%x-%j.err",
    ]:
        assert line in script.splitlines()


def test_rendered_script_warns_with_usr1_before_the_limit_and_is_requeueable():
    lines = render_sbatch(gpu_job(signal_seconds=240), "true").splitlines()
    assert "#SBATCH --signal=USR1@240" in lines
    assert "#SBATCH --requeue" in lines
    assert "#SBATCH --open-mode=append" in lines  # a requeued run appends to the same log


def test_rendered_script_exports_env_and_sruns_the_command_once_per_task():
    script = render_sbatch(gpu_job(), ["wurst-train", "note=two words"])
    assert "export NCCL_SOCKET_IFNAME=ib0" in script.splitlines()
    srun = [line for line in script.splitlines() if line.startswith("srun ")]
    assert srun == [
        "srun --kill-on-bad-exit=1 --ntasks-per-node=8 --cpus-per-task=10 wurst-train 'note=two words'"
    ]
    assert script.index("export NCCL_SOCKET_IFNAME") < script.index("srun ")


def test_a_rendezvous_of_the_submitting_shell_does_not_reach_the_tasks(tmp_path):
    """sbatch copies the submitter's environment; a MASTER_PORT left there by torchrun or an earlier
    Lightning run made every 2-node job of a CI run bind the same port (EADDRINUSE). The job's tasks must
    take theirs from SLURM, unless the job's own env sets one."""
    script = render_sbatch(gpu_job(setup=["env > " + str(tmp_path / "env.txt")]), ["true"])
    shell = script.split("srun ", 1)[0]  # everything the batch shell runs before the tasks start
    env = {"PATH": "/usr/bin:/bin", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "19321", "RANK": "3", "WORLD_SIZE": "8"}
    assert subprocess.run(["bash", "-c", shell], env=env, check=False).returncode == 0
    seen = dict(line.split("=", 1) for line in (tmp_path / "env.txt").read_text().splitlines() if "=" in line)
    assert not {"MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE"} & set(seen)
    pinned = render_sbatch(gpu_job(env={"MASTER_PORT": "29500"}), ["true"])
    assert pinned.index("unset MASTER_ADDR") < pinned.index("export MASTER_PORT=29500")


def test_rendered_script_is_valid_bash():
    script = render_sbatch(gpu_job(setup=["source .venv/bin/activate"]), ["wurst-train", "a=$HOME"])
    assert subprocess.run(["bash", "-n"], input=script, text=True, check=False).returncode == 0


def test_cpu_job_asks_for_no_gpus():
    script = render_sbatch(SlurmJob(job_name="cpu", gpus_per_node=0, tasks_per_node=3), "true")
    assert "--gpus-per-node" not in script


def test_gpus_per_node_must_equal_tasks_per_node():
    with pytest.raises(SlurmConfigError, match=r"gpus_per_node=8 but tasks_per_node=4.*tasks_per_node: 8"):
        validate(gpu_job(tasks_per_node=4), partitions=["a100"])


def test_unknown_partition_is_refused_naming_the_known_ones():
    with pytest.raises(
        SlurmConfigError, match=r"partition='h100' does not exist.*known partitions: a100, debug"
    ):
        validate(gpu_job(partition="h100"), partitions=["a100", "debug"])


def test_warning_signal_must_come_well_before_the_time_limit():
    with pytest.raises(SlurmConfigError, match="signal_seconds=300 with time='5'"):
        validate(gpu_job(time="5"), partitions=["a100"])


def test_warning_signal_for_the_batch_shell_only_is_refused():
    with pytest.raises(SlurmConfigError, match="drop the 'B:' prefix"):
        validate(gpu_job(requeue_signal="B:USR1"), partitions=["a100"])


@pytest.mark.parametrize(
    "text, seconds",
    [
        ("90", 5400),
        ("1:30", 90),
        ("4:00:00", 14400),
        ("2-00:00:00", 172800),
        ("1-12", 129600),
        ("0-0:05", 300),
    ],
)
def test_time_limit_formats_are_sbatchs(text, seconds):
    assert parse_time_limit(text) == seconds


def test_malformed_time_limit_is_refused():
    with pytest.raises(SlurmConfigError, match="not an sbatch time limit"):
        validate(gpu_job(time="two hours"), partitions=["a100"])


def test_unknown_setting_is_refused_by_name():
    with pytest.raises(SlurmConfigError, match=r"unknown SLURM setting\(s\) \['gpus'\]"):
        SlurmJob.from_mapping({"gpus": 8})


@pytest.mark.parametrize("name", ["default", "loopback"])
def test_shipped_cluster_configs_are_valid_jobs(name):
    values = yaml.safe_load((REPO / "conf" / "slurm" / f"{name}.yaml").read_text())
    validate(SlurmJob.from_mapping(values), check_partition=False)


def paper_chain():
    from omegaconf import OmegaConf

    spec = OmegaConf.to_container(
        OmegaConf.load(REPO / "conf" / "slurm" / "chain" / "paper_v2.yaml"), resolve=True
    )
    defaults = yaml.safe_load((REPO / "conf" / "slurm" / "default.yaml").read_text())
    return chain_steps_from_spec(spec, defaults)


def test_paper_chain_spec_is_the_recipe_in_order_then_the_manifest():
    pipeline, steps = paper_chain()
    assert pipeline == "paper_v2"
    assert [s.stage for s in steps] == [
        "stage_a",
        "stage_b_512",
        "stage_b_1024",
        "stage_c_p1",
        "stage_c_p2",
        "stage_c_p3",
        "stage_c_p4",
        "manifest",
    ]
    assert all(s.job.job_name == f"wurst-paper_v2-{s.stage}" for s in steps)
    training, manifest = steps[:-1], steps[-1]
    assert all(
        s.job.gpus_per_node == 8 and s.job.env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1" for s in training
    )
    assert all("trainer=multinode" in s.command for s in training)
    assert (manifest.job.nodes, manifest.job.gpus_per_node) == (1, 0)
    for step in steps:
        validate(step.job, check_partition=False)


@pytest.mark.slow
def test_paper_chain_run_dirs_are_where_its_experiments_train():
    from hydra import compose, initialize_config_dir

    from wurst.train.config import CONFIG_DIR

    _, steps = paper_chain()
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        for step in steps[:-1]:  # the last one writes the manifest
            cfg = compose(config_name="train", overrides=str(step.command).split()[1:])
            assert Path(cfg.run_dir) == Path(step.run_dir), step.stage
