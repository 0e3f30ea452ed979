"""``experiment=finetune/stage_b_lora``: a LoRA fine-tune of the decoder (real ``wurst-train`` run) trains
only the adapters; the compressor and everything else stay the base's; the export is base + adapter."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from wurst.models.hub.lora_export import read_lora_folder

from .conftest import launch

TINY_B = ["stage.data.image_size=128", "stage.data.compressor_size=96", "data.global_batch_size=2",
          "data.num_workers=0", "data.synthesize.num_samples=32", "data.synthesize.num_shards=2", "logger=csv",
          "callbacks.progress_bar=false", "optim.warmup_steps=0", "optim.lr=1.0e-2", "sample_every=0"]


@pytest.mark.slow
def test_a_stage_b_lora_run_trains_only_decoder_adapters_and_exports_base_plus_adapter(base_pipeline, launcher, tmp_path):
    out = tmp_path / "out"
    launch(launcher, ["experiment=finetune/stage_b_lora", f"finetune.base={base_pipeline}", f"paths.output_dir={out}",
                      f"paths.data_dir={tmp_path / 'data'}", "trainer.max_steps=3", "checkpoint_every=3", *TINY_B],
           tmp_path / "run.log")
    run_dir = out / "finetune" / "stage_b_lora"
    checkpoint = torch.load(next((run_dir / "checkpoints").glob("step-*.ckpt")), map_location="cpu", weights_only=True)
    frozen = [k for k in checkpoint["state_dict"] if k.startswith(("network.", "compressor.", "stage_a.", "text_encoder."))
              and ".lora_" not in k]
    assert frozen == [], frozen[:5]
    base_dir, export = base_pipeline / "stage_b" / "export", run_dir / "export"
    base_compressor, compressor = (load_file(str(d / "compressor.safetensors")) for d in (base_dir, export))
    assert all(torch.equal(base_compressor[k], compressor[k]) for k in base_compressor)  # frozen, BatchNorm stats too
    adapter, settings = read_lora_folder(export / "lora", component="decoder")
    base, merged = load_file(str(base_dir / "model.safetensors")), load_file(str(export / "model.safetensors"))
    assert merged.keys() == base.keys()
    scale = settings["lora_alpha"] / settings["r"]
    adapted = {k.removesuffix(".lora_A.weight") for k in adapter if k.endswith(".lora_A.weight")}
    assert adapted
    for key in base:
        module = key.rsplit(".", 1)[0]
        if key.endswith(".weight") and module in adapted:
            delta = scale * adapter[f"{module}.lora_B.weight"] @ adapter[f"{module}.lora_A.weight"]
            torch.testing.assert_close(merged[key], base[key] + delta.reshape(base[key].shape), rtol=0, atol=1e-6)
        else:
            assert torch.equal(merged[key], base[key]), key
    assert max(v.abs().max() for k, v in adapter.items() if "lora_B" in k) > 0
