"""``python -m wurst.eval`` with a witness of what each task did (the srun evaluation test's record).

Usage: exactly ``wurst-eval``'s command line plus ``WURST_TEST_RECORD_DIR=<dir>`` in the environment::

    srun python observed_eval.py prompts=... pipeline=... out=...

The evaluation is the real one (``wurst.eval.__main__.main``, same config); the only change is that
``wurst.eval.evaluate.generate_images`` and ``wurst.eval.evaluate.score`` are wrapped to write down, per
SLURM task, which image ids the task generated and whether it scored. Each task writes
``<dir>/task<SLURM_PROCID>.json``: ``{"task", "node", "rank", "world_size", "written", "skipped", "scored",
"generated_at", "scoring_started_at"}`` (``time.time()``; the "nodes" share one clock).

``WURST_TEST_SLOW_TASK=<task>:<seconds>`` makes that task return from generation that much later (its
images are written), so a test sees whether rank 0 waits for it at the barrier before scoring.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import wurst.eval.evaluate
from wurst.eval.__main__ import main


def observe() -> None:
    record_dir = Path(os.environ["WURST_TEST_RECORD_DIR"])
    record_dir.mkdir(parents=True, exist_ok=True)
    task = os.environ.get("SLURM_PROCID", "none")
    record: dict[str, Any] = {"task": task, "node": os.environ.get("SLURMD_NODENAME", socket.gethostname()),
                              "written": [], "skipped": [], "scored": 0}
    path = record_dir / f"task{task}.json"

    def save() -> None:
        path.write_text(json.dumps(record))

    generate_images, score = wurst.eval.evaluate.generate_images, wurst.eval.evaluate.score

    def observed_generate(*args: Any, **kwargs: Any):
        summary = generate_images(*args, **kwargs)
        slow_task, _, seconds = os.environ.get("WURST_TEST_SLOW_TASK", "").partition(":")
        if slow_task == task:
            time.sleep(float(seconds))
        record.update(rank=summary.rank, world_size=summary.world_size, written=summary.written,
                      skipped=summary.skipped, generated_at=time.time())
        save()
        return summary

    def observed_score(*args: Any, **kwargs: Any):
        record["scored"] += 1
        record.setdefault("scoring_started_at", time.time())
        metrics = score(*args, **kwargs)
        save()
        return metrics

    wurst.eval.evaluate.generate_images = observed_generate
    wurst.eval.evaluate.score = observed_score
    save()


if __name__ == "__main__":
    observe()
    main()
