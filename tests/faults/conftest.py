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

from wurst.train.checkpointing import is_valid_checkpoint
from wurst.train.config import CONFIG_DIR
from wurst.train.export import write_network, write_provenance

from .warm_launcher import WarmLauncher

# The tiniest real Stage C run: 4-sample batches of 96-px compressor images from 64 synthetic
# samples in 4 shards, read in the training process (no worker start-up), EMA from step 2.
TINY_STAGE_C = [
    "stage=c", "experiment=tiny", "logger=csv", "callbacks.progress_bar=false", "data.num_workers=0",
    "data.global_batch_size=4", "data.synthesize.num_samples=64", "data.synthesize.num_shards=4",
    "ema.start=2", "ema.every=2",
]
STEP_CHECKPOINT = re.compile(r"step-(\d+)\.ckpt$")


def stage_c_cached_argv(output_dir: Path, shards: Path, max_steps: int, checkpoint_every: int, *extra: str) -> list[str]:
    """Stage C on a latent cache (``write_cached_shards``): no compressor, no image decoding."""
    return [
        "stage=c", "experiment=tiny", "data=cached", f"data.shards={shards}", "stage.module.compressor_export=null",
        "stage.module.measure_latent_stats=false", "logger=csv", "callbacks.progress_bar=false", "data.num_workers=0",
        "data.global_batch_size=4", "ema.start=2", "ema.every=2", f"paths.output_dir={output_dir}",
        f"trainer.max_steps={max_steps}", f"checkpoint_every={checkpoint_every}", *extra,
    ]


def write_cached_shards(folder: Path, num_shards: int = 4, per_shard: int = 16,
                        poison: dict[str, tuple[str, float]] | None = None) -> list[str]:
    """``wurst-data cache``-format shards of random tiny latents [16, 3, 3] and text states [77, 64];
    ``poison`` maps a key to (member, value) to write into it, e.g. ``{"000003": ("text_hidden", inf)}``.
    Returns the keys."""
    import io
    import tarfile

    import numpy as np

    poison = poison or {}
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    keys = []

    def add(tar, name, payload):
        info = tarfile.TarInfo(name)
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))

    def npy(array):
        buffer = io.BytesIO()
        np.save(buffer, array.astype(np.float16), allow_pickle=False)
        return buffer.getvalue()

    for shard in range(num_shards):
        with tarfile.open(folder / f"{shard:05d}.tar", "w") as tar:
            for i in range(per_shard):
                key = f"{shard:02d}{i:04d}"
                arrays = {"compressor_latents": rng.standard_normal((16, 3, 3)),
                          "text_hidden": rng.standard_normal((77, 64))}
                if key in poison:
                    member, value = poison[key]
                    arrays[member].flat[0] = value
                for member, array in arrays.items():
                    add(tar, f"{key}.{member}.npy", npy(array))
                add(tar, f"{key}.txt", b"a red circle on a blue background")
                keys.append(key)
    # The cache's empty-caption states, which a cached Stage C's caption dropout conditions on.
    np.save(folder / "text_hidden_empty.npy", rng.standard_normal((77, 64)).astype(np.float16))
    return keys


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
    """Every ``*.ckpt`` under ``run_dir`` that fails its zip CRC checks or does not load with
    ``torch.load(weights_only=True)`` (which does not check CRCs: flipped tensor bytes load silently)."""
    bad = []
    for path in sorted(run_dir.rglob("*.ckpt")):
        intact, why = is_valid_checkpoint(path)
        if not intact:
            bad.append(f"{path}: {why}")
            continue
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
