"""NaN and Inf in real ``wurst-train`` runs: poisoned samples make single steps non-finite, which are
skipped and counted in metrics.csv while the run completes; a run whose weights blow up (lr 1e30)
stops after ``max_bad_steps`` bad steps in a row, naming the step and the last good checkpoint."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from .conftest import read_metrics, stage_c_cached_argv, stage_c_dir, write_cached_shards

pytestmark = pytest.mark.slow


def test_poisoned_samples_are_skipped_counted_and_the_run_completes(tmp_path, launcher):
    # One NaN latent and one Inf text state among 64 samples; one finite pass (16 batches of 4) reads both.
    shards = tmp_path / "cache"
    write_cached_shards(shards, poison={"010003": ("compressor_latents", math.nan),
                                        "020011": ("text_hidden", math.inf)})
    out = tmp_path / "out"
    code, output = launcher.run(
        stage_c_cached_argv(out, shards, 16, 8, "data.mode=finite", "diffusion.text_dropout=0",
                            "trainer.log_every_n_steps=1"),
        tmp_path / "run.log",
    )
    assert code == 0, output[-3000:]
    rows = read_metrics(stage_c_dir(out))
    skipped = [float(r["train/skipped_steps"]) for r in rows if r.get("train/skipped_steps")]
    print(f"\npoisoned cache: skipped steps logged {skipped} of 16")
    assert skipped and max(skipped) in (1.0, 2.0)  # 2 poisoned samples: 1 or 2 batches hold them
    exported = load_file(str(stage_c_dir(out) / "export" / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in exported.values())


def test_a_blown_up_run_stops_after_k_bad_steps_naming_the_step_and_the_last_good_checkpoint(tmp_path, launcher):
    shards = tmp_path / "cache"
    write_cached_shards(shards)
    out = tmp_path / "out"
    code, output = launcher.run(
        stage_c_cached_argv(out, shards, 30, 1, "optim.lr=1e30", "optim.warmup_steps=0", "max_bad_steps=3",
                            "trainer.log_every_n_steps=1"),
        tmp_path / "run.log",
    )
    assert code != 0, "a run with lr=1e30 finished"
    said = re.search(r"3 consecutive steps with a non-finite loss or gradients, the last at step (\d+); stopping\. "
                     r"Last good checkpoint: (\S+)\.", output)
    assert said, output[-3000:]
    step, checkpoint = int(said.group(1)), Path(said.group(2))
    print(f"\nlr=1e30: stopped at step {step}; last good checkpoint {checkpoint.name}")
    assert step < 30 and checkpoint.is_file()
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert state["global_step"] == step  # saved after the previous step, the last the run completed
    assert all(torch.isfinite(t).all() for t in state["state_dict"].values())
    rows = read_metrics(stage_c_dir(out))
    assert max(float(r["train/skipped_steps"]) for r in rows if r.get("train/skipped_steps")) >= 2
    assert not (stage_c_dir(out) / "export").exists()
