"""Shared pieces of the fault-injection suite: the warm launcher, tiny hand-off exports, the tiny
Stage C command line, and the checks every fault test makes on a run directory."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from train.config import CONFIG_DIR
from train.export import write_network, write_provenance

from .warm_launcher import WarmLauncher

# The tiniest real Stage C run: 4-sample batches of 96-px compressor images from 64 synthetic
# samples in 4 shards, read in the training process (no worker start-up), EMA from step 2.
TINY_STAGE_C = [
    "stage=c", "experiment=tiny", "logger=csv", "callbacks.progress_bar=false", "data.num_workers=0",
    "data.global_batch_size=4", "data.synthesize.num_samples=64", "data.synthesize.num_shards=4",
    "ema.start=2", "ema.every=2",
]
STEP_CHECKPOINT = re.compile(r"step-(\d+)\.ckpt$")


def tiny_network_config(group: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(Path(CONFIG_DIR) / "model" / group / "tiny.yaml"), resolve=True)


def write_hand_off_exports(output_dir: Path) -> Path:
    """Random tiny Stage A and Stage B exports in ``output_dir/tiny`` (what a Stage C run consumes)."""
    torch.manual_seed(0)
    pipeline = output_dir / "tiny"
    cfg = tiny_network_config("stage_a")
    write_network(pipeline / "stage_a" / "export", "model", instantiate(cfg), cfg)
    for name, group in (("model", "stage_b"), ("compressor", "compressor"), ("text_encoder", "text_encoder")):
        cfg = tiny_network_config(group)
        write_network(pipeline / "stage_b" / "export", name, instantiate(cfg), cfg)
    for stage in ("a", "b"):
        write_provenance(pipeline / f"stage_{stage}" / "export", {"stage": stage, "made_by": "tests/faults"})
    return output_dir


def stage_c_argv(output_dir: Path, max_steps: int, checkpoint_every: int, *extra: str) -> list[str]:
    return [*TINY_STAGE_C, f"paths.output_dir={output_dir}", f"trainer.max_steps={max_steps}",
            f"checkpoint_every={checkpoint_every}", *extra]


def stage_c_dir(output_dir: Path) -> Path:
    return output_dir / "tiny" / "stage_c"


def checkpoint_step(path: Path) -> int:
    match = STEP_CHECKPOINT.search(path.name)
    if match is None:
        raise ValueError(f"{path} is not a step-<N>.ckpt checkpoint")
    return int(match.group(1))


def unreadable_checkpoints(run_dir: Path) -> list[str]:
    """Every ``*.ckpt`` under ``run_dir`` that does not load with ``torch.load(weights_only=True)``."""
    bad = []
    for path in sorted(run_dir.rglob("*.ckpt")):
        try:
            torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 (any failure to load is what we look for)
            bad.append(f"{path}: {type(error).__name__}: {error}")
    return bad


def read_metrics(run_dir: Path) -> list[dict[str, str]]:
    import csv

    with open(run_dir / "logs" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def read_events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def wait_for_event(run, events: Path, index: int, timeout: float = 300) -> dict:
    """The ``index``-th fault-point event (0-based), once ``run`` has reached it and stopped there."""
    import time

    deadline = time.monotonic() + timeout
    while len(found := read_events(events)) <= index:
        if not run.alive():
            raise AssertionError(f"run {run.pid} ended before reaching fault point {index}:\n{run.output()[-3000:]}")
        if time.monotonic() > deadline:
            run.kill()
            raise TimeoutError(f"run {run.pid} did not reach fault point {index} in {timeout} s")
        time.sleep(0.05)
    return found[index]


@pytest.fixture(scope="session")
def launcher():
    warm = WarmLauncher()
    yield warm
    warm.close()
