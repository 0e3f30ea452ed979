"""Stage B's conditioning augmentation keeps the compressor in the autograd graph (what DDP needs: every
rank has a gradient for every compressor parameter whatever it drew) with the per-batch rule of
REFERENCE.md: 5% of batches zeroed, else 30% noised with t ~ U[0, 0.5)."""

from __future__ import annotations

import pytest
import torch

from wurst.train.run_stage import build_module
from wurst.train.seeding import seed_step

from .conftest import compose, hand_off

DRAWS = 2000


@pytest.fixture(scope="module")
def stage_b(tmp_path_factory):
    output_dir = hand_off(tmp_path_factory.mktemp("conditioning"), "b")
    return build_module(compose(["stage=b", "experiment=tiny", f"paths.output_dir={output_dir}"]))


def test_a_zeroed_batch_still_sends_a_zero_gradient_through_the_compressor(stage_b):
    images = torch.rand(2, 3, 96, 96)
    zeroed_step = next(step for step in range(1000) if _draws(stage_b, step)[0])
    seed_step(0, zeroed_step, 0)
    z = stage_b.compressor(images)
    effnet = stage_b.condition_latents(z)
    assert torch.count_nonzero(effnet) == 0 and effnet.grad_fn is not None
    effnet.sum().backward()
    grads = [p.grad for p in stage_b.compressor.parameters()]
    assert all(g is not None for g in grads) and all(torch.count_nonzero(g) == 0 for g in grads)


def _draws(module, step: int) -> tuple[bool, bool]:
    """(zeroed, noised) of ``condition_latents`` at ``step``, read from its output."""
    z = torch.ones(4, 16, 3, 3)
    seed_step(0, step, 0)
    out = module.condition_latents(z)
    zeroed = not bool(out.any())
    return zeroed, (not zeroed) and not torch.equal(out, z)


def test_the_draws_follow_the_per_batch_rule(stage_b):
    draws = [_draws(stage_b, step) for step in range(DRAWS)]
    zeroed = sum(z for z, _ in draws) / DRAWS
    noised = sum(n for _, n in draws) / DRAWS
    print(f"\n{DRAWS} batches: zeroed {zeroed:.3f} (0.05), noised {noised:.3f} (0.95 x 0.3 = 0.285)")
    assert abs(zeroed - 0.05) < 0.015
    assert abs(noised - 0.95 * 0.3) < 0.035
