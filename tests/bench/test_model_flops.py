"""Counted model FLOPs and MFU (benchmarks/model_flops.py)."""

from __future__ import annotations

import pytest
import torch

from benchmarks.model_flops import (
    count_on_meta,
    count_training_flops,
    model_flops_utilisation,
    peak_flops_per_s,
)
from wurst.models.stage_c import StageC

TINY_C = {"c_in": 16, "c": 64, "c_cond": 64, "c_r": 64, "depth": 2, "nhead": 2, "dropout": 0.1}


def stage_c_flops(batch: int, side: int = 3) -> int:
    return count_on_meta(lambda: StageC(**TINY_C), [], {"x": [batch, 16, side, side], "r": [batch],
                                                         "c": [batch, 77, 64]})


def test_count_is_positive():
    assert stage_c_flops(2) > 0


def test_count_scales_with_batch_size():
    assert stage_c_flops(4) == 2 * stage_c_flops(2)


def test_count_grows_with_the_latent_side():
    # 4× the latent positions; the text-side projections (77 tokens) stay, so less than 4× in all.
    assert stage_c_flops(2, side=3) < stage_c_flops(2, side=6) < 4 * stage_c_flops(2, side=3)


def test_meta_count_equals_the_count_on_real_tensors_with_math_attention():
    # On meta, attention runs the math kernel (backward = 2× forward matmuls: model FLOPs). A flash
    # kernel's backward also recomputes QKᵀ, which model FLOPs leave out.
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    network = StageC(**TINY_C)
    with sdpa_kernel(SDPBackend.MATH):
        real = count_training_flops(network, [torch.randn(2, 16, 3, 3), torch.rand(2), torch.randn(2, 77, 64)])
    assert real == stage_c_flops(2)


def test_diffusers_prior_counts_the_same_as_ours():
    from diffusers.pipelines.deprecated.wuerstchen import WuerstchenPrior

    theirs = count_on_meta(lambda: WuerstchenPrior(**TINY_C), [], {"x": [2, 16, 3, 3], "r": [2], "c": [2, 77, 64]})
    assert theirs == stage_c_flops(2)


@pytest.mark.parametrize(
    ("name", "tflops"),
    [
        ("NVIDIA H100 80GB HBM3", 989.0),  # SXM5
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H100 NVL", 835.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA A100-PCIE-40GB", 312.0),
        ("NVIDIA L4", 121.0),
        ("NVIDIA L40S", 362.0),
    ],
)
def test_peak_flops_by_gpu_name(name, tflops):
    assert peak_flops_per_s(name) == tflops * 1e12


def test_unlisted_device_has_no_peak():
    assert peak_flops_per_s("Tesla V100-SXM2-16GB") is None
    assert peak_flops_per_s("CPU") is None


def test_mfu_is_achieved_over_peak_flops():
    assert model_flops_utilisation(400e12, 2.0, 1000e12) == pytest.approx(0.2)


def test_mfu_is_none_without_a_peak():
    assert model_flops_utilisation(400e12, 2.0, None) is None
