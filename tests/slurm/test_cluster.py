"""The loopback test cluster: two SLURM nodes on this machine that behave like a real cluster."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from wurst.slurm.cluster import LoopbackCluster, unavailable_reason
from wurst.slurm.submit import submit
from wurst.slurm.template import SlurmConfigError, validate

from .conftest import REPO, slurm_cli


def running(pid: int) -> bool:
    """Whether ``pid`` is a live process (an unreaped zombie has exited)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


UP_STATES = {"idle", "mixed", "allocated"}  # other tests' jobs may be running on the nodes


def test_cluster_shows_two_nodes_up_in_the_default_debug_partition(cluster):
    sinfo = subprocess.run(
        ["sinfo", "-h", "-N", "-o", "%N %P %T"], capture_output=True, text=True, check=True
    )
    rows = sorted(line.split() for line in sinfo.stdout.splitlines())
    assert [(node, partition) for node, partition, _ in rows] == [("n1", "debug*"), ("n2", "debug*")]
    assert {state for _, _, state in rows} <= UP_STATES


def test_node_names_resolve_to_loopback(cluster):
    assert socket.gethostbyname("n1") == socket.gethostbyname("n2") == "127.0.0.1"


def test_two_node_job_runs_one_task_on_each_node(cluster, tmp_path, make_job, wait_job):
    log = tmp_path / "job.out"
    job = make_job("wurst-test-nodes", log, nodes=2)
    job_id = submit(
        job, ["bash", "-c", "echo task=$SLURM_PROCID node=$SLURMD_NODENAME"], tmp_path / "job.sbatch"
    )
    status = wait_job(job_id, 60, log)
    assert status.state == "COMPLETED", log.read_text()
    tasks = sorted(line for line in log.read_text().splitlines() if line.startswith("task="))
    assert tasks == ["task=0 node=n1", "task=1 node=n2"]


def test_partition_check_asks_the_cluster(cluster, make_job, tmp_path):
    with pytest.raises(SlurmConfigError, match=r"partition='gpu' does not exist.*known partitions: debug"):
        validate(make_job("wurst-test-partition", tmp_path / "x.out", partition="gpu"))


def test_bad_partition_submits_nothing(cluster, make_job, tmp_path):
    before = subprocess.run(
        ["squeue", "-h", "--states=all", "-o", "%i"], check=False, capture_output=True, text=True
    ).stdout
    with pytest.raises(SlurmConfigError):
        submit(
            make_job("wurst-test-partition", tmp_path / "x.out", partition="gpu"),
            "true",
            tmp_path / "x.sbatch",
        )
    after = subprocess.run(
        ["squeue", "-h", "--states=all", "-o", "%i"], check=False, capture_output=True, text=True
    ).stdout
    assert before == after
    assert not (tmp_path / "x.sbatch").exists()


def test_cli_starts_and_stops_a_second_cluster_beside_the_first(cluster, tmp_path):
    state = tmp_path / "second"
    env = {k: v for k, v in os.environ.items() if k != "SLURM_CONF"}
    up = subprocess.run(
        [sys.executable, "-m", "wurst.slurm", "cluster-up", "--state-dir", str(state)],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert up.returncode == 0, up.stderr
    assert up.stdout.strip() == f"export SLURM_CONF={state.resolve() / 'slurm.conf'}"
    second = LoopbackCluster(state)
    assert second.node_states() == {"n1": "idle", "n2": "idle"}
    pids = [int((state / f).read_text()) for f in ("slurmctld.pid", "slurmd.n1.pid", "slurmd.n2.pid")]
    munge_dir = Path(json.loads((state / "cluster.json").read_text())["munge_dir"])

    down = subprocess.run(
        [sys.executable, "-m", "wurst.slurm", "cluster-down", "--state-dir", str(state)],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert down.returncode == 0, down.stderr
    assert not any(running(pid) for pid in pids)
    assert not munge_dir.exists()
    states = cluster.node_states()  # the session's cluster is untouched
    assert sorted(states) == ["n1", "n2"] and set(states.values()) <= UP_STATES


def test_unavailable_reason_explains_a_missing_binary(tmp_path):
    reason = unavailable_reason(search_path=str(tmp_path))
    assert reason.startswith("SLURM/munge binaries not found: munged, slurmctld, slurmd")
    assert "apt-get install -y slurm-wlm munge" in reason


@pytest.mark.parametrize(
    "setting, message",
    [
        ("gpus_per_node=2", "gpus_per_node=2 but tasks_per_node=1: Lightning's SLURM environment runs one"),
        ("partition=gpu", "partition='gpu' does not exist on this cluster; known partitions: debug"),
    ],
)
def test_submit_command_refuses_bad_settings_before_submitting(cluster, tmp_path, setting, message):
    def job_ids() -> str:
        return subprocess.run(
            ["squeue", "-h", "--states=all", "-o", "%i"], check=True, capture_output=True, text=True
        ).stdout

    before = job_ids()
    script = tmp_path / "c.sbatch"
    proc = slurm_cli(
        "submit", "--config", str(REPO / "conf" / "slurm" / "loopback.yaml"), "--set", setting,
        "--script", str(script), "--", "wurst-train", "stage=c", "experiment=tiny",
    )  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and message in proc.stderr
    assert not script.exists() and job_ids() == before
