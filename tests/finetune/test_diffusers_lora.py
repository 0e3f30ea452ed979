"""The adapter a LoRA run exports (``export/lora``) is read by diffusers' own ``load_lora_weights``
into the base model's diffusers export, and that pipeline draws our sampler's image with the adapter."""

from __future__ import annotations

import pytest
import torch
from diffusers import WuerstchenCombinedPipeline
from diffusers.pipelines.deprecated.wuerstchen.pipeline_wuerstchen_prior import DEFAULT_STAGE_C_TIMESTEPS
from peft import set_peft_model_state_dict

from wurst.models.cascade import CascadeSampler
from wurst.models.hub.diffusers_export import export_pipeline
from wurst.models.hub.lora_export import read_lora_folder
from wurst.models.hub.pipeline_dir import read_network, read_text_encoder
from wurst.train.lora import add_adapters

SIDE = 128
PROMPT = "a red circle on a blue background"
# float32 CPU: the same tolerance as tests/hub/test_export.py (measured there: 3e-7 without an adapter).
TOLERANCE = 1e-4
V2_CALL = {"prior_guidance_scale": 4.0, "decoder_guidance_scale": 0.0}


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def base_folder(base_pipeline, tmp_path_factory):
    return export_pipeline(base_pipeline, tmp_path_factory.mktemp("hub") / "base", repo_id="someone/wurst-tiny")


def draw_diffusers(pipe: WuerstchenCombinedPipeline) -> torch.Tensor:
    return pipe(PROMPT, height=SIDE, width=SIDE, prior_timesteps=DEFAULT_STAGE_C_TIMESTEPS,
                prior_num_inference_steps=30, num_inference_steps=3, generator=seeded(7), output_type="pt",
                **V2_CALL).images


def our_cascade(base_pipeline, stage_c: torch.nn.Module) -> CascadeSampler:
    export = {s: base_pipeline / f"stage_{s}" / "export" for s in "abc"}
    return CascadeSampler(stage_c=stage_c, stage_b=read_network(export["b"]), stage_a=read_network(export["a"]),
                          text_encoder_c=read_text_encoder(export["c"]), text_encoder_b=read_text_encoder(export["b"]),
                          prior_t_grid="v2", prior_steps=None, decoder_steps=3, **V2_CALL)


@pytest.mark.slow
def test_diffusers_loads_the_exported_adapter_and_draws_our_samplers_image(lora_run, base_pipeline, base_folder):
    pipe = WuerstchenCombinedPipeline.from_pretrained(base_folder)
    pipe.set_progress_bar_config(disable=True)
    before = draw_diffusers(pipe)
    pipe.prior_pipe.load_lora_weights(lora_run / "export" / "lora")
    theirs = draw_diffusers(pipe)

    # Ours: the base Stage C with the same adapter injected by peft (not merged).
    adapter, settings = read_lora_folder(lora_run / "export" / "lora")
    stage_c = read_network(base_pipeline / "stage_c" / "export")
    add_adapters(stage_c, {"rank": settings["r"], "alpha": settings["lora_alpha"],
                           "target_modules": settings["target_modules"]})
    result = set_peft_model_state_dict(stage_c, adapter, adapter_name="default")
    assert not result.unexpected_keys
    ours = our_cascade(base_pipeline, stage_c.eval())([PROMPT], SIDE, SIDE, generator=seeded(7))
    # And the merged weights the run exported as model.safetensors.
    merged = our_cascade(base_pipeline, read_network(lora_run / "export"))([PROMPT], SIDE, SIDE, generator=seeded(7))

    difference = (ours - theirs).abs().max().item()
    effect = (theirs - before).abs().max().item()
    print(f"\nadapter in diffusers vs our sampler with the adapter: max |Δ| = {difference:.2e}; "
          f"merged export: {(merged - theirs).abs().max().item():.2e}; the adapter's own effect: {effect:.2e}")
    assert theirs.shape == ours.shape == (1, 3, SIDE, SIDE)
    assert difference < TOLERANCE
    assert (merged - theirs).abs().max() < TOLERANCE
    # Not vacuous: the adapter moves the image 20x the tolerance or more (measured 1.1e-2..2.4e-2 as the
    # tiny data changed), 1e5x the difference measured between the two pipelines.
    assert effect > 20 * TOLERANCE, "the adapter barely changes the image: the comparison would prove nothing"
