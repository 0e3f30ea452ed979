"""The GPU path, run on the CPU: bf16-mixed autocast and torch.compile (inductor) through real wurst-train.

CPU autocast runs bf16 matmuls and convolutions as a GPU's does; inductor compiles for the CPU with gcc.
What only a GPU shows (fused AdamW, NCCL, TF32, NVML energy) is listed in the README's GPU section.
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch._dynamo
from hydra.utils import instantiate
from omegaconf import OmegaConf
from safetensors.torch import load_file

from wurst.train.config import CONFIG_DIR
from wurst.train.export import write_network, write_provenance

REPO = Path(CONFIG_DIR).parent


def write_tiny_export(export_dir: Path, stage: str) -> None:
    """A randomly initialised tiny Stage A export, or Stage B's (+ compressor, text encoder)."""
    torch.manual_seed(0)
    parts = {"a": [("model", "stage_a")],
             "b": [("model", "stage_b"), ("compressor", "compressor"), ("text_encoder", "text_encoder")]}[stage]
    for name, group in parts:
        cfg = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "model" / group / "tiny.yaml"), resolve=True)
        write_network(export_dir, name, instantiate(cfg), cfg)
    write_provenance(export_dir, {"stage": stage, "made_by": "tests/gpu_path"})

# Each stage's inputs to its network forward in the tiny configs (what the training step feeds it).
TINY_INPUTS = {
    "stage_a": lambda: (torch.rand(2, 3, 128, 128),),
    "stage_b": lambda: (torch.randn(2, 4, 32, 32), torch.rand(2), torch.randn(2, 16, 3, 3), torch.randn(2, 77, 64)),
    "stage_c": lambda: (torch.randn(2, 16, 3, 3), torch.rand(2), torch.randn(2, 77, 64)),
    "compressor": lambda: (torch.rand(2, 3, 96, 96),),
}


def train(stage: str, out: Path, *overrides: str) -> subprocess.CompletedProcess:
    root = out / "tiny"
    if stage in ("b", "c") and not (root / "stage_a" / "export").is_dir():
        write_tiny_export(root / "stage_a" / "export", "a")
    if stage == "c" and not (root / "stage_b" / "export").is_dir():
        write_tiny_export(root / "stage_b" / "export", "b")
    argv = [sys.executable, "-m", "wurst.train", f"stage={stage}", "experiment=tiny", "data.num_workers=0",
            "sample_every=0", "logger=csv", f"paths.output_dir={out}", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    return subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=900, check=False)


def last_checkpoint(run_dir: Path) -> dict:
    path = max((run_dir / "checkpoints").glob("step-*.ckpt"))
    return torch.load(path, map_location="cpu", weights_only=True)


def losses(run_dir: Path) -> list[float]:
    with open(run_dir / "logs" / "metrics.csv") as f:
        return [float(row["train/loss"]) for row in csv.DictReader(f) if row.get("train/loss")]


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["a", "b", "c"])
def test_bf16_mixed_on_cpu_trains_with_fp32_weights_and_ema_and_exports_the_ema(stage, tmp_path):
    done = train(stage, tmp_path, "trainer.precision=bf16-mixed", "trainer.max_steps=3", "checkpoint_every=3",
                 "ema.start=0", "ema.every=1", "trainer.log_every_n_steps=1")
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = tmp_path / "tiny" / f"stage_{stage}"
    assert losses(run_dir) and all(math.isfinite(v) for v in losses(run_dir))
    state = last_checkpoint(run_dir)["state_dict"]
    floating = {k: v for k, v in state.items() if v.is_floating_point()}
    assert {v.dtype for v in floating.values()} == {torch.float32}, "weights and EMA must stay fp32 under autocast"
    ema = {k.removeprefix("ema.shadow."): v for k, v in floating.items() if k.startswith("ema.shadow.")}
    network = {k.removeprefix("network."): v for k, v in floating.items() if k.startswith("network.")}
    assert ema and any(not torch.equal(ema[k], network[k]) for k in ema), "EMA is a blend, not the weights"
    export = load_file(str(run_dir / "export" / "model.safetensors"))
    assert {k: v for k, v in export.items() if v.is_floating_point()}.keys() == ema.keys()
    assert all(export[k].dtype == torch.float32 and torch.equal(export[k], ema[k]) for k in ema)


@pytest.mark.parametrize("group", sorted(TINY_INPUTS))
def test_the_networks_compile_without_graph_breaks(group):
    """dynamo's view of what ``compile=true`` compiles (the network's forward in the training step); a
    break is a silent slow path on a GPU. The backend does not matter for breaks, so this traces only."""
    torch.manual_seed(0)
    network = instantiate(OmegaConf.load(REPO / "conf" / "model" / group / "tiny.yaml")).train()
    torch._dynamo.reset()
    explained = torch._dynamo.explain(network)(*TINY_INPUTS[group]())
    assert explained.graph_break_count == 0, [str(r.reason) for r in explained.break_reasons]
    assert explained.graph_count == 1


@pytest.mark.slow
def test_compile_true_trains_with_inductor_reports_no_breaks_and_resumes_without_compile(tmp_path):
    done = train("c", tmp_path, "compile=true", "trainer.max_steps=2", "checkpoint_every=2", "ema.enabled=false")
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads(next((tmp_path / "tiny" / "hydra").glob("*/metrics.json")).read_text())
    assert metrics["compile/graph_breaks"] == 0.0
    run_dir = tmp_path / "tiny" / "stage_c"
    state = last_checkpoint(run_dir)["state_dict"]
    assert not any("_orig_mod" in k for k in state), "compiled checkpoints must keep the eager names"
    export = load_file(str(run_dir / "export" / "model.safetensors"))
    assert not any("_orig_mod" in k for k in export)  # EMA off: the export is the compiled network itself
    resumed = train("c", tmp_path, "trainer.max_steps=3", "checkpoint_every=3", "ema.enabled=false")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert last_checkpoint(run_dir)["global_step"] == 3
