"""The diffusers converters: compatibility reports, config mapping, copies, and the Stage B branch."""

from __future__ import annotations

import pytest
import torch
from diffusers.pipelines.deprecated.wuerstchen import PaellaVQModel, WuerstchenDiffNeXt, WuerstchenPrior

from wurst.models.diffusers_compat import (
    check_state_dict_compatible,
    diffusers_config,
    from_diffusers,
    state_dict_differences,
    to_diffusers,
)
from wurst.models.stage_a import StageA
from wurst.models.stage_c import StageC

PRIOR_CFG = {"c_in": 8, "c": 32, "c_cond": 24, "c_r": 16, "depth": 1, "nhead": 2, "dropout": 0.0}
VQ_CFG = {"levels": 2, "bottleneck_blocks": 1, "embed_dim": 16, "num_vq_embeddings": 32}


def test_compatible_state_dict_passes_the_check():
    check_state_dict_compatible(StageC(**PRIOR_CFG), WuerstchenPrior, PRIOR_CFG)
    check_state_dict_compatible(StageA(**VQ_CFG).state_dict(), PaellaVQModel, VQ_CFG)


def test_incompatible_state_dict_reports_missing_extra_and_shape_differences():
    state = StageC(**PRIOR_CFG).state_dict()
    state.pop("projection.bias")
    state["extra.weight"] = torch.zeros(1)
    state["cond_mapper.0.weight"] = torch.zeros(32, 99)
    with pytest.raises(ValueError) as error:
        check_state_dict_compatible(state, WuerstchenPrior, PRIOR_CFG)
    message = str(error.value)
    assert "1 key(s) only in ours: extra.weight" in message
    assert "1 key(s) only in diffusers: projection.bias" in message
    assert "cond_mapper.0.weight: ours (32, 99) vs diffusers (32, 24)" in message


def test_long_reports_are_capped():
    report = state_dict_differences({f"k{i}": torch.zeros(1) for i in range(25)}, {})
    assert (
        report == [report[0]]
        and report[0].startswith("25 key(s) only in ours")
        and "and 15 more" in report[0]
    )


def test_diffusers_config_drops_only_our_training_switches():
    assert diffusers_config(StageC(**PRIOR_CFG, gradient_checkpointing=True)) == PRIOR_CFG
    assert "beta" not in diffusers_config(StageA(**VQ_CFG, beta=0.5))


def test_config_survives_a_round_trip():
    ours = StageA(**VQ_CFG, beta=0.5, scale_factor=0.25)
    back = from_diffusers(to_diffusers(ours))
    assert back.config == ours.config


def test_gradient_checkpointing_switch_survives_a_round_trip():
    theirs = to_diffusers(StageC(**PRIOR_CFG, gradient_checkpointing=True))
    assert theirs.is_gradient_checkpointing
    assert from_diffusers(theirs).gradient_checkpointing


def test_converted_model_keeps_train_mode_and_holds_copies():
    ours = StageC(**PRIOR_CFG).train()
    theirs = to_diffusers(ours)
    assert theirs.training
    with torch.no_grad():
        theirs.projection.weight.add_(1.0)
    assert not torch.equal(theirs.projection.weight, ours.projection.weight)
    assert all(p.requires_grad for p in theirs.parameters())


def test_unknown_models_are_refused_with_the_known_pairs():
    with pytest.raises(
        TypeError, match=r"no diffusers converter for Linear; known pairs: StageA ↔ PaellaVQModel"
    ):
        to_diffusers(torch.nn.Linear(2, 2))


def test_directions_are_not_confused():
    with pytest.raises(TypeError, match="from_diffusers expects a diffusers model"):
        from_diffusers(StageC(**PRIOR_CFG))
    with pytest.raises(TypeError, match="to_diffusers expects one of our networks"):
        to_diffusers(WuerstchenPrior(**PRIOR_CFG))


# --- Stage B (models/stage_b.py is written by another engineer against the same contract) ----------

# Two small DiffNeXt configs that differ in levels, widths, heads and effnet injection.
DIFFNEXT_CONFIGS = [
    {
        "c_hidden": [16, 32], "nhead": [-1, 2], "blocks": [1, 1], "level_config": ["CT", "CTA"],
        "inject_effnet": [False, True], "effnet_embd": 16, "clip_embd": 24, "c_cond": 32, "dropout": 0.0,
    },
    {
        "c_in": 3, "c_out": 3, "c_r": 33, "patch_size": 1, "c_hidden": [8, 16, 24], "nhead": [-1, 2, 3],
        "blocks": [1, 2, 1], "level_config": ["CT", "CTA", "CTA"], "inject_effnet": [True, False, True],
        "effnet_embd": 6, "clip_embd": 12, "c_cond": 16, "dropout": 0.0,
    },
]  # fmt: skip


def _diffnext_inputs(cfg: dict):
    x = torch.randn(2, cfg.get("c_in", 4), 16, 16)
    r = torch.rand(2)
    effnet = torch.randn(2, cfg["effnet_embd"], 3, 3)
    clip = torch.randn(2, 5, cfg["clip_embd"])
    return x, r, effnet, clip


def _well_conditioned(model, randomize, seed: int = 0):
    # DiffNeXt reads eps off (x - a) / b with b = sigmoid(.) squeezed into [1e-3, 1 - 1e-3]; a random head
    # drives some b to 1e-3 and amplifies float32 rounding 1000-fold. Shrinking the head keeps b near 0.5.
    randomize(model, seed=seed)
    with torch.no_grad():
        model.clf[1].weight.mul_(0.1)
        model.clf[1].bias.mul_(0.1)
    return model.eval()


def _stage_b_module():
    import wurst.models.stage_b

    return wurst.models.stage_b


@pytest.mark.parametrize("cfg", DIFFNEXT_CONFIGS, ids=["2-level", "3-level"])
def test_diffnext_weights_loaded_into_stage_b_give_the_same_eps(cfg, randomize):
    stage_b = _stage_b_module()
    theirs = _well_conditioned(WuerstchenDiffNeXt(**cfg), randomize)
    ours = from_diffusers(theirs)
    assert isinstance(ours, stage_b.StageB) and not ours.training
    inputs = _diffnext_inputs(cfg)
    with torch.no_grad():
        torch.testing.assert_close(ours(*inputs), theirs(*inputs), atol=1e-5, rtol=0)


@pytest.mark.parametrize("cfg", DIFFNEXT_CONFIGS, ids=["2-level", "3-level"])
def test_stage_b_weights_loaded_into_diffnext_give_the_same_eps(cfg, randomize):
    stage_b = _stage_b_module()
    ours = _well_conditioned(stage_b.StageB(**cfg), randomize, seed=1)
    theirs = to_diffusers(ours)
    assert isinstance(theirs, WuerstchenDiffNeXt) and not theirs.training
    inputs = _diffnext_inputs(cfg)
    with torch.no_grad():
        torch.testing.assert_close(theirs(*inputs), ours(*inputs), atol=1e-5, rtol=0)
