"""FSDP for Stages B and C, as far as the CPU allows.

Lightning's FSDPStrategy refuses the CPU (quoted and checked below, so the day it stops refusing this
test says so). torch's own FSDP does shard on CPU over gloo, so the wrap plan wurst configures
(conf/trainer/fsdp.yaml → train/fsdp_plan.py: one unit per block) is run with it: 2 processes train the
tiny Stage C and end with the weights DDP ends with, and the full-state-dict checkpoint (model +
optimizer, what ``state_dict_type: full`` saves) resumed into a freshly wrapped model continues exactly.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from wurst.train.fsdp_plan import wrap_classes

from .conftest import REPO, TORCHRUN

PAYLOAD = Path(__file__).resolve().parent / "payloads" / "fsdp_cpu_train.py"
STEPS, SAVE_AT = 4, 2


def test_lightning_refuses_fsdp_on_the_cpu_with_this_message():
    from hydra import compose, initialize_config_dir

    from wurst.train.config import CONFIG_DIR

    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=["stage=c", "experiment=tiny", "trainer=fsdp",
                                                      "trainer.accelerator=cpu", "trainer.precision=32-true"])
    strategy = instantiate(cfg.trainer.strategy)
    policy = strategy.kwargs["auto_wrap_policy"]  # Lightning turned the class set into torch's policy
    assert set(policy._module_classes) == wrap_classes() and not strategy.kwargs["use_orig_params"]
    with pytest.raises(Exception, match="The strategy `fsdp` requires a GPU accelerator"):
        instantiate(cfg.trainer)


def run(mode: str, out: Path, *extra: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        [str(TORCHRUN), "--standalone", "--nproc_per_node=2", str(PAYLOAD), "--mode", mode, "--steps", str(STEPS),
         "--out", str(out), *extra],
        cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("fsdp")
    run("fsdp", out / "fsdp", "--save-at", str(SAVE_AT))
    run("ddp", out / "ddp")
    run("fsdp", out / "resumed", "--resume-from", str(out / "fsdp" / "checkpoint.pt"))
    load = lambda path: torch.load(path, map_location="cpu", weights_only=True)
    return {"fsdp": load(out / "fsdp" / "final_fsdp.pt"), "ddp": load(out / "ddp" / "final_ddp.pt"),
            "resumed": load(out / "resumed" / "final_fsdp.pt")}


@pytest.mark.slow
def test_the_wrap_plan_shards_stage_c_block_by_block(runs):
    assert runs["fsdp"]["units"] == 1 + 3 * 2  # the root and (ResBlock, TimestepBlock, AttnBlock) × depth 2


@pytest.mark.slow
def test_fsdp_on_cpu_ends_with_the_weights_ddp_ends_with(runs):
    fsdp, ddp = runs["fsdp"]["state"], runs["ddp"]["state"]
    assert fsdp.keys() == ddp.keys()  # full state dict: the network's own names, nothing sharded
    assert max((fsdp[k] - ddp[k]).abs().max().item() for k in ddp) < 1e-5


@pytest.mark.slow
def test_the_full_state_dict_checkpoint_resumes_into_a_new_fsdp_model_exactly(runs):
    resumed, straight = runs["resumed"]["state"], runs["fsdp"]["state"]
    assert max((resumed[k] - straight[k]).abs().max().item() for k in straight) < 1e-6


@pytest.mark.slow
def test_the_real_stage_c_module_wraps_without_a_unit_of_mixed_frozen_and_trained_parameters(tmp_path):
    """use_orig_params=false refuses a mixed unit when wrapping; the module's text encoder and EMA copy are
    frozen, its network trained: the plan gives each its own units (the wrap would raise otherwise)."""
    run("module", tmp_path)
    units, trained_ema_units = (int(v) for v in (tmp_path / "module.txt").read_text().split())
    # root, network blocks (3 × 2), the text encoder, the EMA copy and its blocks (3 × 2)
    assert units == 1 + 6 + 1 + 1 + 6 and trained_ema_units == 0
