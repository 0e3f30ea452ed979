"""A warm launcher for ``wurst-train`` runs under fault injection.

A cold ``python -m wurst.train`` spends ~8 CPU-seconds importing torch, Lightning, Hydra, open_clip and
timm before it trains; the kill test starts eleven runs. So one server process imports the training
stack once and, per request, forks a run: a new process in its own session that installs its fault
points (fault_points.py), points stdout/stderr at a log file and calls ``wurst.train.__main__.main()`` with
the requested command line, exactly what the ``wurst-train`` console script calls. The server never
computes anything itself, so forking it is safe (no OpenMP or other threads started yet).

The test kills a run with ``SIGKILL`` to its process group (the run and any DataLoader worker), as a
node failure or ``scancel`` would. A run's exit status is written by the run itself to ``<log>.rc``
(no file: it was killed); the server ignores SIGCHLD so finished runs never linger as zombies.

Run as a script, this file is the server: one JSON request per stdin line
``{"argv": [...], "log": path, "env": {...}, "faults": {...}}``, answered with ``{"pid": n}``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent


# --- the server (this file run as a script) ---------------------------------------------------------


def _serve() -> None:
    sys.path[:0] = [str(REPO), str(HERE)]
    os.chdir(REPO)
    # What every run imports anyway; importing here is the whole point of the server.
    import importlib

    for name in ("torch", "lightning", "lightning.pytorch.loggers", "torchmetrics", "transformers", "open_clip",
                 "timm", "wurst.data.datamodule", "wurst.train.__main__", "wurst.train.run_stage", "wurst.train.callbacks",
                 "wurst.train.stage_a_module", "wurst.train.stage_c_module", "wurst.models.semantic_compressor",
                 "wurst.models.text_encoder", "wurst.models.stage_c", "wurst.slurm.preemption", "fault_points"):
        importlib.import_module(name)

    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    print("ready", flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _run(request)  # never returns
        print(json.dumps({"pid": pid}), flush=True)


def _run(request: dict[str, Any]) -> None:
    code = 1
    try:
        os.setsid()
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the run's own children (workers) must be waitable
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        os.environ.update(request.get("env", {}))
        import fault_points

        import wurst.train.__main__
        fault_points.install(request.get("faults") or {})
        sys.argv = ["wurst-train", *request["argv"]]
        try:
            wurst.train.__main__.main()
            code = 0
        except SystemExit as done:
            code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    except BaseException:  # noqa: BLE001 (report anything, then leave without running the server's code)
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        Path(request["log"] + ".rc").write_text(str(code))
        os._exit(code)


# --- the client (the tests) ------------------------------------------------------------------------


class Run:
    """One launched ``wurst-train`` process."""

    def __init__(self, pid: int, log: Path):
        self.pid = pid
        self.log = log

    def alive(self) -> bool:
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        return True

    def kill(self) -> None:
        """SIGKILL the run and its DataLoader workers (its process group); returns once they are gone."""
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        while self.alive():
            time.sleep(0.01)

    def wait(self, timeout: float = 600) -> int:
        """The exit status (-9 when killed); kills the run and raises TimeoutError after ``timeout``."""
        deadline = time.monotonic() + timeout
        while self.alive():
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(f"wurst-train run {self.pid} still running after {timeout} s; log:\n"
                                   f"{self.output()[-3000:]}")
            time.sleep(0.05)
        rc = Path(str(self.log) + ".rc")
        return int(rc.read_text()) if rc.is_file() else -signal.SIGKILL

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.is_file() else ""


class WarmLauncher:
    """Starts the server; :meth:`start` forks a run from it."""

    def __init__(self):
        self.server = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve())], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            text=True, cwd=REPO,
        )
        ready = self.server.stdout.readline().strip()
        if ready != "ready":
            raise RuntimeError(f"the warm launcher did not start (said {ready!r}); run "
                               f"`python {Path(__file__).resolve()}` to see why")

    def start(self, argv: list[str], log: Path, faults: dict[str, Any] | None = None,
              env: dict[str, str] | None = None) -> Run:
        Path(str(log) + ".rc").unlink(missing_ok=True)
        request = {"argv": list(argv), "log": str(log), "faults": faults or {}, "env": dict(env or {})}
        self.server.stdin.write(json.dumps(request) + "\n")
        self.server.stdin.flush()
        return Run(int(json.loads(self.server.stdout.readline())["pid"]), Path(log))

    def run(self, argv: list[str], log: Path, timeout: float = 600, **kwargs: Any) -> tuple[int, str]:
        """Start a run and wait for it: (exit status, its output)."""
        launched = self.start(argv, log, **kwargs)
        code = launched.wait(timeout)
        return code, launched.output()

    def close(self) -> None:
        self.server.stdin.close()
        self.server.wait(timeout=30)


if __name__ == "__main__":
    _serve()
