"""``experiment=finetune/stage_c`` (full): a real ``wurst-train`` run starts from the base's Stage C,
text encoder and hand-off, trains every Stage C weight and exports a plain Stage C in the base's config."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from .conftest import finetune_argv, launch


@pytest.mark.slow
def test_a_full_fine_tune_starts_from_the_base_and_exports_it_trained_in_the_bases_layout(base_pipeline, launcher, tmp_path):
    out = tmp_path / "out"
    launch(launcher, finetune_argv("stage_c", base_pipeline, out, 3, 3, "optim.lr=1.0e-3", "ema.start=0"),
           tmp_path / "run.log")
    base_dir, export = base_pipeline / "stage_c" / "export", out / "finetune" / "stage_c" / "export"
    base, tuned = load_file(str(base_dir / "model.safetensors")), load_file(str(export / "model.safetensors"))
    assert tuned.keys() == base.keys()
    moved = [k for k in base if not torch.equal(base[k], tuned[k])]
    assert len(moved) > len(base) // 2  # every layer trains (EMA β 0.995 from step 0 moves them a little)
    # Three steps from the base stay near it: a fresh initialisation would be far from every base weight.
    assert max((base[k] - tuned[k]).abs().max().item() for k in base) < 0.05
    assert json.loads((export / "config.json").read_text()) == json.loads((base_dir / "config.json").read_text())
    text_base, text = load_file(str(base_dir / "text_encoder.safetensors")), load_file(str(export / "text_encoder.safetensors"))
    assert all(torch.equal(text_base[k], text[k]) for k in text_base)  # the base's frozen encoder, not a new one
    assert json.loads((export / "hand_off.json").read_text()) == json.loads((base_dir / "hand_off.json").read_text())
    assert not (export / "lora").exists()
