"""Non-finite losses or gradients: the step is skipped and counted, the weights stay untouched, and
after ``max_bad_steps`` in a row the run stops with a message naming the step and the checkpoint."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from wurst.train.run_stage import build_module

from .conftest import compose_train


def cached_batches(count: int, poisoned: set[int]) -> list[dict]:
    torch.manual_seed(0)
    batches = []
    for i in range(count):
        z = torch.randn(4, 16, 3, 3)
        if i in poisoned:
            z[0, 0, 0, 0] = float("nan")
        batches.append({"compressor_latents": z, "text_hidden": torch.randn(4, 77, 64), "captions": ["x"] * 4})
    return batches


def fit(module, batches, steps, clip: float | None = 1.0):
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=clip)
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    return trainer


def stage_c(tmp_path, max_bad_steps: int):
    cfg = compose_train(["stage=c", "experiment=tiny", f"paths.output_dir={tmp_path}", f"max_bad_steps={max_bad_steps}",
                         "stage.module.compressor_export=null", "diffusion.text_dropout=0"])
    return build_module(cfg)


def test_a_nan_batch_is_skipped_and_counted_and_training_goes_on(tmp_path):
    module = stage_c(tmp_path, max_bad_steps=3)
    trainer = fit(module, cached_batches(6, poisoned={2}), steps=5)
    assert module.skipped_steps == 1
    assert trainer.global_step == 5  # a skipped step still counts as a step of the schedule
    assert all(torch.isfinite(p).all() for p in module.network.parameters())


def test_consecutive_nan_steps_stop_the_run_naming_the_step(tmp_path):
    module = stage_c(tmp_path, max_bad_steps=3)
    with pytest.raises(FloatingPointError, match=r"3 consecutive steps with a non-finite loss.*at step 3.*Last good checkpoint"):
        fit(module, cached_batches(8, poisoned={1, 2, 3, 4}), steps=8)
    assert all(torch.isfinite(p).all() for p in module.network.parameters())


def test_stage_a_skips_a_nan_batch_as_the_diffusion_stages_do(tmp_path):
    """Stage A (manual optimisation, two optimisers) shares the rule: skipped, counted, weights untouched."""
    cfg = compose_train(["stage=a", "experiment=tiny", f"paths.output_dir={tmp_path}", "max_bad_steps=3",
                         "stage.module.disc_start=1"])
    module = build_module(cfg)
    torch.manual_seed(0)
    batches = [{"images": torch.rand(2, 3, 128, 128)} for _ in range(4)]
    batches[2]["images"][0, 0, 0, 0] = float("nan")
    trainer = fit(module, batches, steps=4, clip=None)  # Stage A clips its own gradients
    assert module.non_finite.skipped == 1
    assert trainer.global_step == 4  # one step per batch, the skipped one included
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_stage_a_stops_after_max_bad_steps(tmp_path):
    cfg = compose_train(["stage=a", "experiment=tiny", f"paths.output_dir={tmp_path}", "max_bad_steps=2"])
    module = build_module(cfg)
    batches = [{"images": torch.full((2, 3, 128, 128), float("nan"))} for _ in range(4)]
    with pytest.raises(FloatingPointError, match="2 consecutive steps with a non-finite loss"):
        fit(module, batches, steps=4, clip=None)


def test_stage_a_optimisers_hold_every_parameter(tmp_path):
    """Both optimisers get all of their network's parameters (a parameter generator was once consumed by
    the fused-AdamW device check: Stage A's first convolution never trained)."""
    module = build_module(compose_train(["stage=a", "experiment=tiny", f"paths.output_dir={tmp_path}"]))
    (opt_ae, opt_d), _ = module.configure_optimizers()
    held = {id(p) for group in opt_ae.param_groups for p in group["params"]}
    assert held == {id(p) for p in module.network.parameters()}
    assert {id(p) for group in opt_d.param_groups for p in group["params"]} == {
        id(p) for p in module.discriminator.parameters()}
