"""The loopback test cluster: munge, slurmctld and two slurmd "nodes" (n1, n2) on this one machine.

The tests (and anyone without a cluster) submit real sbatch jobs to it: two SLURM nodes whose
daemons both run here, addressed over 127.0.0.1, so `srun` across "two nodes" and a torch.distributed
rendezvous at n1 behave as on a real cluster. Everything lives in one state directory (config, logs,
spool, controller state) plus a private munge directory; ports are free ones on loopback, so a
cluster started here does not touch a system-wide SLURM. Client commands find it through
``SLURM_CONF`` (``LoopbackCluster.environment()``).

Facts that make two slurmd's on one host work (issue 8): ``NodeName=n[1-2] NodeHostname=<hostname -s>
NodeAddr=127.0.0.1 Port=<p>-<p+1>``, per-node pid/spool/log paths with ``%n``, ``slurmd -N n1``,
``proctrack/linuxproc`` and ``task/none`` (no cgroups in containers), ``select/cons_tres``; munged runs as
the munge user with a 1024-byte key (owner munge, mode 0400); n1 and n2 resolve to 127.0.0.1 via
/etc/hosts so the rendezvous address Lightning derives from SLURM_NODELIST resolves.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

NODES = ("n1", "n2")
PARTITION = "debug"
# CPUs each "node" advertises (config_overrides lets it exceed the real core count): several small
# test jobs (a two-node DDP job, a requeue job, a sweep) can then share the two nodes at once.
CPUS_PER_NODE = 4
HOSTS_TAG = "# wurst loopback SLURM cluster"
DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "sinfo", "squeue", "scancel")


class ClusterError(RuntimeError):
    """The loopback cluster could not be started or stopped."""


def unavailable_reason(search_path: str | None = None) -> str | None:
    """Why the loopback cluster cannot run here (``None`` when it can): missing binaries or not root.

    ``search_path``: where to look for the binaries (default: PATH plus /usr/sbin and /sbin).
    """
    if search_path is None:
        search_path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    missing = [name for name in DAEMONS if shutil.which(name, path=search_path) is None]
    if missing:
        return (
            f"SLURM/munge binaries not found: {', '.join(missing)}; install the Debian packages "
            "`apt-get install -y slurm-wlm munge` (.ci/run does this)"
        )
    if os.geteuid() != 0:
        return "the loopback SLURM cluster needs root (munged runs as the munge user, slurmd as root)"
    try:
        pwd.getpwnam("munge")
    except KeyError:
        return "no `munge` user: reinstall the munge package"
    if shutil.which("runuser") is None:
        return "`runuser` (util-linux) not found: it starts munged as the munge user"
    return None


def _binary(name: str) -> str:
    found = shutil.which(name) or str(Path("/usr/sbin", name))
    if not Path(found).exists():
        raise ClusterError(
            f"{name} not found; install slurm-wlm and munge (`apt-get install -y slurm-wlm munge`)"
        )
    return found


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port_run(start: int, length: int, stop: int = 40000) -> int:
    """First port p >= start with p .. p+length-1 all free on loopback."""
    for base in range(start, stop - length):
        if all(_port_free(base + i) for i in range(length)):
            return base
    raise ClusterError(f"no {length} consecutive free ports in [{start}, {stop}) on 127.0.0.1")


@dataclass(frozen=True)
class ClusterPorts:
    controller: int
    first_node: int  # n1 listens here, n2 on first_node + 1


class LoopbackCluster:
    """A two-node SLURM cluster on this machine, kept in ``state_dir``.

    ``up()`` starts it and returns once ``sinfo`` shows n1 and n2 idle; ``down()`` cancels its jobs,
    stops its daemons (by their pid files) and removes the private munge directory. Both are
    idempotent; ``LoopbackCluster(state_dir)`` reattaches to a cluster started earlier (the CLI's
    cluster-down does that).
    """

    def __init__(self, state_dir: str | os.PathLike, controller_port: int = 16817, node_port: int = 17001):
        self.state_dir = Path(state_dir).resolve()
        self._wanted_ports = (controller_port, node_port)

    # -- paths -------------------------------------------------------------------------------------
    @property
    def conf_path(self) -> Path:
        return self.state_dir / "slurm.conf"

    @property
    def record_path(self) -> Path:
        """cluster.json: ports, munge directory and pid files of a started cluster."""
        return self.state_dir / "cluster.json"

    def environment(self) -> dict[str, str]:
        """Environment variables that point SLURM client commands (sbatch, squeue, ...) here."""
        return {"SLURM_CONF": str(self.conf_path)}

    def _record(self) -> dict:
        if not self.record_path.is_file():
            return {}
        return json.loads(self.record_path.read_text())

    def _env(self) -> dict[str, str]:
        return {**os.environ, **self.environment()}

    # -- start -------------------------------------------------------------------------------------
    def up(self, timeout_s: float = 60.0) -> dict[str, str]:
        """Starts munged, slurmctld, slurmd n1 and n2; returns ``environment()``.

        Raises ``ClusterError`` naming the failing daemon and its log when a daemon does not come up.
        """
        reason = unavailable_reason()
        if reason:
            raise ClusterError(reason)
        if self.is_up():
            return self.environment()
        if self.record_path.is_file():  # a cluster here died or was half started: clear what is left
            self.down()
        try:
            self._start(timeout_s)
        except BaseException:
            self.down()
            raise
        return self.environment()

    def _start(self, timeout_s: float) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        (self.state_dir / "ctld").mkdir(exist_ok=True)
        ports = ClusterPorts(
            controller=_free_port_run(self._wanted_ports[0], 1),
            first_node=_free_port_run(self._wanted_ports[1], len(NODES)),
        )
        munge_dir = self._start_munge()
        record = {
            "ports": {"controller": ports.controller, "first_node": ports.first_node},
            "munge_dir": str(munge_dir),
            "hostname": socket.gethostname().split(".")[0],
        }
        self.record_path.write_text(json.dumps(record, indent=2))
        self.conf_path.write_text(
            self.render_config(ports, munge_dir / "run" / "munge.socket", record["hostname"])
        )
        self._map_node_names()
        self._run_daemon([_binary("slurmctld"), "-f", str(self.conf_path)], "slurmctld", "slurmctld.log")
        for node in NODES:
            self._run_daemon(
                [_binary("slurmd"), "-N", node, "-f", str(self.conf_path)],
                f"slurmd -N {node}",
                f"slurmd.{node}.log",
            )
        self._wait_idle(timeout_s)

    def render_config(self, ports: ClusterPorts, munge_socket: Path, hostname: str) -> str:
        """slurm.conf for this cluster (short timeouts so requeues and restarts take seconds)."""
        s = self.state_dir
        last_node_port = ports.first_node + len(NODES) - 1
        return "\n".join(
            [
                "# Written by slurm/cluster.py: a two-node loopback test cluster.",
                "ClusterName=wurstloop",
                f"SlurmctldHost={hostname}(127.0.0.1)",
                f"SlurmctldPort={ports.controller}",
                "SlurmUser=root",
                "SlurmdUser=root",
                "AuthType=auth/munge",
                "CredType=cred/munge",
                # cred_expire also sets how long a requeued job waits before it may start again (it + 1 s).
                f"AuthInfo=socket={munge_socket},cred_expire=5",
                f"StateSaveLocation={s / 'ctld'}",
                f"SlurmctldPidFile={s / 'slurmctld.pid'}",
                f"SlurmctldLogFile={s / 'slurmctld.log'}",
                f"SlurmdPidFile={s / 'slurmd.%n.pid'}",
                f"SlurmdSpoolDir={s / 'slurmd.%n'}",
                f"SlurmdLogFile={s / 'slurmd.%n.log'}",
                "ProctrackType=proctrack/linuxproc",
                "TaskPlugin=task/none",
                "SelectType=select/cons_tres",
                "SelectTypeParameters=CR_Core",
                "SlurmdParameters=config_overrides",
                "MpiDefault=none",
                "JobRequeue=1",
                "ReturnToService=2",
                "SchedulerType=sched/builtin",
                # Look at pending jobs every second, so a requeued job restarts as soon as it is eligible.
                "SchedulerParameters=sched_interval=1",
                "AccountingStorageType=accounting_storage/none",
                "JobAcctGatherType=jobacct_gather/none",
                "SlurmdTimeout=120",
                "MessageTimeout=20",
                "InactiveLimit=0",
                # SIGTERM -> SIGKILL grace: long enough for a tiny job to write its checkpoint.
                "KillWait=15",
                # Keep finished jobs in the controller for an hour: without accounting, `scontrol show job`
                # is how `python -m wurst.slurm status` reports them.
                "MinJobAge=3600",
                "SlurmctldDebug=info",
                "SlurmdDebug=info",
                (
                    f"NodeName=n[1-{len(NODES)}] NodeHostname={hostname} NodeAddr=127.0.0.1 "
                    f"Port={ports.first_node}-{last_node_port} CPUs={CPUS_PER_NODE} RealMemory=4000 "
                    "State=UNKNOWN"
                ),
                f"PartitionName={PARTITION} Nodes=n[1-{len(NODES)}] Default=YES MaxTime=INFINITE State=UP",
                "",
            ]
        )

    def _start_munge(self) -> Path:
        # munged refuses keys others can read and sockets in dirs others cannot traverse, and it runs as
        # the munge user, so it gets its own world-traversable directory outside the (root-only) state dir.
        munge = pwd.getpwnam("munge")
        munge_dir = Path(tempfile.mkdtemp(prefix="wurst-munge-"))
        munge_dir.chmod(0o755)
        key_dir, run_dir = munge_dir / "key", munge_dir / "run"
        key_dir.mkdir(mode=0o700)
        run_dir.mkdir(mode=0o755)
        key = key_dir / "munge.key"
        key.write_bytes(os.urandom(1024))
        for path in (key_dir, run_dir, key):
            os.chown(path, munge.pw_uid, munge.pw_gid)
        key.chmod(0o400)
        cmd = [
            "runuser",
            "-u",
            "munge",
            "--",
            _binary("munged"),
            f"--key-file={key}",
            f"--socket={run_dir / 'munge.socket'}",
            f"--pid-file={run_dir / 'munged.pid'}",
            f"--log-file={key_dir / 'munged.log'}",
            f"--seed-file={key_dir / 'munged.seed'}",
        ]
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
        if proc.returncode != 0:
            raise ClusterError(f"munged did not start: {proc.stderr.strip() or proc.stdout.strip()}")
        deadline = time.monotonic() + 10
        while not (run_dir / "munge.socket").exists():
            if time.monotonic() > deadline:
                raise ClusterError(f"munged started but made no socket in {run_dir}")
            time.sleep(0.1)
        return munge_dir

    def _map_node_names(self) -> None:
        """Adds ``127.0.0.1 n1 n2`` to /etc/hosts unless the names already resolve to loopback.

        The line stays after ``down()``: it is harmless, and another loopback cluster may be using it.
        """

        def resolves(name: str) -> bool:
            try:
                return socket.gethostbyname(name).startswith("127.")
            except OSError:
                return False

        if all(resolves(node) for node in NODES):
            return
        with open("/etc/hosts", "a") as hosts:
            hosts.write(f"127.0.0.1 {' '.join(NODES)} {HOSTS_TAG}\n")

    def _run_daemon(self, cmd: list[str], name: str, log_name: str) -> None:
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=self._env())
        if proc.returncode != 0:
            log = self.state_dir / log_name
            tail = log.read_text()[-2000:] if log.is_file() else ""
            raise ClusterError(
                f"{name} failed to start (exit {proc.returncode}): {proc.stderr.strip()}\n"
                f"--- {log} ---\n{tail}"
            )

    def node_states(self) -> dict[str, str]:
        """``{"n1": "idle", ...}`` from sinfo; empty when the controller does not answer."""
        proc = subprocess.run(
            ["sinfo", "-h", "-N", "-o", "%N %T"],
            check=False,
            capture_output=True,
            text=True,
            env=self._env(),
            timeout=30,
        )
        if proc.returncode != 0:
            return {}
        states = {}
        for line in proc.stdout.splitlines():
            parts = line.split()
            if len(parts) == 2:
                states[parts[0]] = parts[1].lower()
        return states

    def _wait_idle(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        states: dict[str, str] = {}
        while time.monotonic() < deadline:
            states = self.node_states()
            if all(states.get(node) == "idle" for node in NODES):
                return
            time.sleep(0.5)
        raise ClusterError(
            f"nodes not idle after {timeout_s:.0f}s (sinfo says {states or 'nothing'}); "
            f"see {self.state_dir}/slurmctld.log and slurmd.n*.log"
        )

    def is_up(self) -> bool:
        """Whether this state dir's controller answers and both nodes are up."""
        if not self.conf_path.is_file() or not self.record_path.is_file():
            return False
        states = self.node_states()
        return all(node in states and not states[node].startswith("down") for node in NODES)

    # -- stop --------------------------------------------------------------------------------------
    def down(self, timeout_s: float = 30.0) -> None:
        """Cancels this cluster's jobs, stops its daemons and removes its munge directory."""
        record = self._record()
        if self.conf_path.is_file():
            self._cancel_jobs(timeout_s / 2)
        pid_files = [(self.state_dir / f"slurmd.{node}.pid", "slurmd") for node in NODES]
        pid_files.append((self.state_dir / "slurmctld.pid", "slurmctld"))
        munge_dir = Path(record["munge_dir"]) if record.get("munge_dir") else None
        if munge_dir is not None:
            pid_files.append((munge_dir / "run" / "munged.pid", "munged"))
        for pid_file, daemon in pid_files:
            _stop_pid_file(pid_file, daemon, timeout_s / 4)
        if munge_dir is not None and munge_dir.is_dir():
            shutil.rmtree(munge_dir, ignore_errors=True)
        self.record_path.unlink(missing_ok=True)

    def _cancel_jobs(self, timeout_s: float) -> None:
        env = self._env()
        listed = subprocess.run(
            ["squeue", "-h", "-o", "%A"], check=False, capture_output=True, text=True, env=env, timeout=30
        )
        ids = listed.stdout.split() if listed.returncode == 0 else []
        if not ids:
            return
        subprocess.run(["scancel", *ids], check=False, capture_output=True, env=env, timeout=30)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            listed = subprocess.run(
                ["squeue", "-h", "-o", "%A"], check=False, capture_output=True, text=True, env=env, timeout=30
            )
            if listed.returncode != 0 or not listed.stdout.split():
                return
            time.sleep(0.5)


def _stop_pid_file(pid_file: Path, daemon: str, timeout_s: float) -> None:
    """SIGTERM the ``daemon`` whose pid ``pid_file`` holds, SIGKILL it if it outlives ``timeout_s``.

    A pid whose process is not that daemon (a stale file, the pid reused) is left alone.
    """
    try:
        pid = int(pid_file.read_text().split()[0])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError, IndexError):
        return
    if not cmdline or Path(cmdline[0].decode(errors="replace")).name != daemon:
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not _alive(pid):
            return
        time.sleep(0.1)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            # A zombie (state Z) has exited; its parent just has not reaped it yet.
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False
