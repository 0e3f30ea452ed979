"""A LoRA fine-tune of Stage C (``experiment=finetune/stage_c_lora``, real ``wurst-train`` runs): only
the adapters train, checkpoints hold adapters + optimiser (not the base), the export is the base plus
the adapter, and a kill -9 + ``resume=auto`` ends with the uninterrupted run's adapter."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from wurst.models.hub.lora_export import read_lora_folder

from .conftest import LORA_EVERY, LORA_FAST, LORA_STEPS, finetune_argv, launch, wait_for_pause


def newest_checkpoint(run_dir):
    return torch.load(max((run_dir / "checkpoints").glob("step-*.ckpt")), map_location="cpu", weights_only=True)


def adapters(run_dir) -> dict[str, torch.Tensor]:
    return read_lora_folder(run_dir / "export" / "lora")[0]


def test_a_lora_checkpoint_holds_the_adapters_and_their_optimiser_state_not_the_base(lora_run):
    checkpoint = newest_checkpoint(lora_run)
    network_keys = [k for k in checkpoint["state_dict"] if k.startswith(("network.", "text_encoder.", "compressor."))]
    assert network_keys and all(".lora_" in k for k in network_keys), network_keys[:5]
    assert checkpoint["global_step"] == LORA_STEPS
    states = checkpoint["optimizer_states"][0]["state"]
    assert len(states) == len(network_keys)  # one AdamW state per adapter tensor, none for frozen weights


def test_the_export_is_the_base_plus_the_adapter_and_nothing_else_changed(lora_run, base_pipeline):
    base = load_file(str(base_pipeline / "stage_c" / "export" / "model.safetensors"))
    merged = load_file(str(lora_run / "export" / "model.safetensors"))
    adapter, settings = read_lora_folder(lora_run / "export" / "lora")
    assert merged.keys() == base.keys()  # the plain StageC layout: no base_layer / lora keys
    scale = settings["lora_alpha"] / settings["r"]
    adapted = {k.removesuffix(".lora_A.weight") for k in adapter if k.endswith(".lora_A.weight")}
    assert len(adapted) == 2 * 6  # tiny Stage C: depth 2 × (to_q, to_k, to_v, to_out.0, channelwise.0, channelwise.4)
    for key in base:
        module = key.rsplit(".", 1)[0]
        if key.endswith(".weight") and module in adapted:
            delta = scale * adapter[f"{module}.lora_B.weight"] @ adapter[f"{module}.lora_A.weight"]
            assert delta.abs().max() > 1e-4, f"{module}: the adapter did not train"
            torch.testing.assert_close(merged[key], base[key] + delta, rtol=0, atol=1e-6)
        else:
            assert torch.equal(merged[key], base[key]), f"{key} changed: only adapters may train"


@pytest.mark.slow
def test_kill_9_during_a_lora_run_and_resume_give_the_uninterrupted_adapter(lora_run, base_pipeline, launcher, tmp_path):
    out = tmp_path / "killed"
    # The straight run's shards (identical: seeded), so the kill lands in training, not in data preparation.
    argv = finetune_argv("stage_c_lora", base_pipeline, out, LORA_STEPS, LORA_EVERY, *LORA_FAST,
                         data_dir=lora_run.parent.parent / "data")
    run_dir = out / "finetune" / "stage_c_lora"
    events = tmp_path / "events.jsonl"
    run = launcher.start(argv, tmp_path / "killed.log", env={"OMP_NUM_THREADS": "1"},
                         faults={"events": str(events), "pause": {"point": "step", "step": LORA_EVERY + 2}})
    where = wait_for_pause(run, events)
    run.kill()
    assert where["point"] == "step" and where["step"] == LORA_EVERY + 2
    assert not (run_dir / "export").exists()
    output = launch(launcher, argv, tmp_path / "resumed.log")
    assert f"step-{LORA_EVERY:09d}.ckpt" in output.split("resuming from", 1)[1].splitlines()[0]
    expected, resumed = adapters(lora_run), adapters(run_dir)
    assert expected.keys() == resumed.keys()
    different = [k for k in expected if not torch.equal(expected[k], resumed[k])]
    assert different == [], f"{len(different)} adapter tensors differ from the uninterrupted run"


@pytest.mark.slow
def test_8bit_adamw_with_gradient_checkpointing_trains_adapters_and_resumes_exactly(base_pipeline, launcher, tmp_path):
    """bitsandbytes' AdamW8bit runs on CPU too (0.43+): tensors of >= 4,096 elements get uint8 moments,
    smaller ones 32-bit moments (its min_8bit_size); rank 64 makes the tiny adapters big enough."""
    extra = (*LORA_FAST, "optim.name=adamw8bit", "gradient_checkpointing=true", "stage.module.lora.rank=64",
             "stage.module.lora.alpha=64")
    straight, split = tmp_path / "straight", tmp_path / "split"
    launch(launcher, finetune_argv("stage_c_lora", base_pipeline, straight, 4, 2, *extra), tmp_path / "a.log")
    launch(launcher, finetune_argv("stage_c_lora", base_pipeline, split, 2, 2, *extra), tmp_path / "b.log")
    output = launch(launcher, finetune_argv("stage_c_lora", base_pipeline, split, 4, 2, *extra), tmp_path / "c.log")
    assert "resuming from" in output
    run_dir = straight / "finetune" / "stage_c_lora"
    states = newest_checkpoint(run_dir)["optimizer_states"][0]["state"].values()
    # bitsandbytes 0.50 keeps a tensor's moments under __bnb_optimizer_quant_state__ (older: at the top).
    moments = [s.get("__bnb_optimizer_quant_state__", s)["state1"] for s in states]
    assert any(m.dtype == torch.uint8 for m in moments), "no 8-bit optimiser state"
    expected, resumed = adapters(run_dir), adapters(split / "finetune" / "stage_c_lora")
    assert all(torch.equal(expected[k], resumed[k]) for k in expected)
    assert max(v.abs().max() for k, v in expected.items() if "lora_B" in k) > 0  # the adapters trained
