"""The official-style reference loop on diffusers' networks (benchmarks/reference_loop.py)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from benchmarks.reference_loop import OfficialStyleLoop, diffusers_network
from wurst.train.config import CONFIG_DIR
from wurst.train.networks import instantiate_network

OPTIM = {"lr": 1e-3, "betas": [0.9, 0.999], "weight_decay": 0.01, "eps": 1e-8, "warmup_steps": 1, "grad_clip": 1.0}
CPU = torch.device("cpu")


def tiny(group: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(Path(CONFIG_DIR) / "model" / group / "tiny.yaml"), resolve=True)


def cached_batch(batch: int = 2) -> dict:
    return {
        "compressor_latents": torch.randn(batch, 16, 3, 3).half(),
        "text_hidden": torch.randn(batch, 77, 64).half(),
        "captions": ["a red circle on a blue background"] * batch,
    }


def image_batch(batch: int = 2) -> dict:
    return {
        "images": torch.rand(batch, 3, 128, 128),
        "compressor_images": torch.rand(batch, 3, 96, 96),
        "captions": ["a red circle on a blue background"] * batch,
    }


def stage_c_loop(**kwargs) -> OfficialStyleLoop:
    torch.manual_seed(0)
    network = diffusers_network("c", tiny("stage_c"))
    return OfficialStyleLoop("c", network, instantiate_network(tiny("text_encoder")), CPU, OPTIM, **kwargs)


def test_diffusers_network_takes_our_config():
    network = diffusers_network("c", tiny("stage_c"))  # gradient_checkpointing and _target_ dropped
    assert type(network).__name__ == "WuerstchenPrior"
    assert network.config.c == 64


def test_stage_c_step_from_cache_updates_the_network_and_logs_finite_figures():
    loop = stage_c_loop()
    before = [p.detach().clone() for p in loop.network.parameters()]
    loop.step(cached_batch())
    assert any(not torch.equal(b, p) for b, p in zip(before, loop.network.parameters()))
    assert all(math.isfinite(v) for v in loop.logged.values())


def test_ema_copy_is_refreshed_every_ema_every_iterations():
    loop = stage_c_loop(ema_every=2)
    loop.step(cached_batch())
    assert not all(torch.equal(e, p) for e, p in zip(loop.ema.parameters(), loop.network.parameters()))
    loop.step(cached_batch())  # iteration 2: before ema_start the copy is outright
    assert all(torch.equal(e, p) for e, p in zip(loop.ema.parameters(), loop.network.parameters()))


def test_stage_b_trains_the_compressor_jointly():
    torch.manual_seed(0)
    compressor = instantiate_network(tiny("compressor"))
    loop = OfficialStyleLoop(
        "b", diffusers_network("b", tiny("stage_b")), instantiate_network(tiny("text_encoder")), CPU, OPTIM,
        compressor=compressor, stage_a=instantiate_network(tiny("stage_a")),
    )
    before = [p.detach().clone() for p in compressor.parameters()]
    loop.step(image_batch())
    assert any(not torch.equal(b, p) for b, p in zip(before, compressor.parameters()))
    assert math.isfinite(loop.logged["loss"])


def test_stage_c_from_images_without_a_compressor_is_an_error():
    with pytest.raises(ValueError, match="has no compressor"):
        stage_c_loop().step({"images": torch.rand(2, 3, 96, 96), "captions": ["x", "y"]})


def test_unknown_stage_is_an_error():
    with pytest.raises(ValueError, match="Stage 'b' or 'c'"):
        OfficialStyleLoop("a", torch.nn.Linear(1, 1), torch.nn.Identity(), CPU, OPTIM)


def test_stage_b_without_stage_a_is_an_error():
    with pytest.raises(ValueError, match="needs stage_a"):
        OfficialStyleLoop("b", torch.nn.Linear(1, 1), torch.nn.Identity(), CPU, OPTIM)
