"""Fixtures for the fine-tune tests: a tiny base pipeline (ours, random), real ``wurst-train`` runs of
``experiment=finetune/*`` on it through the warm launcher of tests/faults, and the runs' outputs."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def load_helper(path: Path, name: str):
    """tests/ is not a package (pytest --import-mode=importlib): load a helper module by path."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


hub = load_helper(HERE.parent / "hub" / "conftest.py", "wurst_tests_finetune_hub_conftest")
warm = load_helper(HERE.parent / "faults" / "warm_launcher.py", "wurst_tests_finetune_warm_launcher")

# A tiny LoRA fine-tune: 4-sample batches of 96-px compressor images (16×3×3 latents) from 64
# synthetic samples, read in the training process; lr high enough that a few steps move the adapter.
TINY_FINETUNE = [
    "stage.data.compressor_size=96", "data.global_batch_size=4", "data.num_workers=0",
    "data.synthesize.num_samples=64", "data.synthesize.num_shards=4", "logger=csv",
    "callbacks.progress_bar=false", "optim.warmup_steps=0", "sample_every=0",
]


def finetune_argv(experiment: str, base: Path, output_dir: Path, steps: int, every: int, *extra: str,
                  data_dir: Path | None = None) -> list[str]:
    """``data_dir``: where the synthetic shards are (written on first use; default: beside the outputs)."""
    return [f"experiment=finetune/{experiment}", f"finetune.base={base}", f"paths.output_dir={output_dir}",
            f"paths.data_dir={data_dir or output_dir / 'data'}", f"trainer.max_steps={steps}", f"checkpoint_every={every}",
            *TINY_FINETUNE, *extra]


@pytest.fixture(scope="session")
def base_pipeline(tmp_path_factory) -> Path:
    """A complete tiny pipeline directory with random weights (tests/hub's), read-only."""
    return hub.write_tiny_pipeline(tmp_path_factory.mktemp("finetune_base") / "tiny")


@pytest.fixture(scope="session")
def launcher():
    server = warm.WarmLauncher()
    yield server
    server.close()


def launch(launcher, argv: list[str], log: Path, **kwargs) -> str:
    code, output = launcher.run(argv, log, env={"OMP_NUM_THREADS": "1"}, **kwargs)
    assert code == 0, output[-4000:]
    return output


LORA_STEPS, LORA_EVERY = 8, 4
# lr 1e-2: in 8 steps the adapters move the prior far enough that its images change visibly.
LORA_FAST = ("optim.lr=1.0e-2",)


@pytest.fixture(scope="session")
def lora_run(base_pipeline, launcher, tmp_path_factory) -> Path:
    """One uninterrupted tiny LoRA fine-tune of the base (8 steps, a checkpoint every 4); its run dir."""
    out = tmp_path_factory.mktemp("lora_straight")
    launch(launcher, finetune_argv("stage_c_lora", base_pipeline, out, LORA_STEPS, LORA_EVERY, *LORA_FAST),
           out / "run.log")
    return out / "finetune" / "stage_c_lora"


def wait_for_pause(run, events: Path, timeout: float = 300) -> dict:
    """The first fault-point event of ``run`` (tests/faults/fault_points.py), once it stopped there."""
    import json
    import time

    deadline = time.monotonic() + timeout
    while not (events.is_file() and events.read_text().strip()):
        if not run.alive():
            raise AssertionError(f"run {run.pid} ended before its fault point:\n{run.output()[-3000:]}")
        if time.monotonic() > deadline:
            run.kill()
            raise TimeoutError(f"run {run.pid} did not reach its fault point in {timeout} s")
        time.sleep(0.05)
    return json.loads(events.read_text().splitlines()[0])


def hub_test_module(name: str):
    """A tests/hub test module (which imports ``.conftest``), loaded under a stand-in package."""
    import types

    package = "wurst_tests_finetune_hub"
    if package not in sys.modules:
        stand_in = types.ModuleType(package)
        stand_in.__path__ = [str(HERE.parent / "hub")]
        sys.modules[package] = stand_in
        sys.modules[f"{package}.conftest"] = hub
    return load_helper(HERE.parent / "hub" / f"{name}.py", f"{package}.{name}")
