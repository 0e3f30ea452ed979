"""Semantic compressor: z = BatchNorm(1×1 conv(EfficientNet features of ImageNet-normalised images))."""

from __future__ import annotations

import pytest
import safetensors.torch
import timm
import torch
from hydra.utils import instantiate

from wurst.models.semantic_compressor import IMAGENET_MEAN, IMAGENET_STD, SemanticCompressor

TINY_BACKBONE = "test_efficientnet"  # timm's test model: 256 channels at stride 32


@pytest.fixture(scope="module")
def compressor() -> SemanticCompressor:
    return SemanticCompressor(backbone=TINY_BACKBONE).eval()


def test_tiny_config_maps_96px_images_to_16x3x3(model_conf):
    model = instantiate(model_conf("compressor", "tiny")).eval()
    assert model(torch.rand(2, 3, 96, 96)).shape == (2, 16, 3, 3)


@pytest.mark.parametrize("size", [(64, 128), (384, 384)])
def test_latent_is_16_channels_at_a_32nd_of_the_image_side(compressor, size):
    h, w = size
    with torch.no_grad():
        assert compressor(torch.rand(1, 3, h, w)).shape == (1, 16, h // 32, w // 32)


def test_paper_backbone_gives_1280_channels_at_stride_32(model_conf):
    cfg = model_conf("compressor", "paper")
    cfg.pretrained = False  # no download in tests; the architecture is what is checked
    with torch.device("meta"):  # shapes only: the 21 M-parameter forward is too slow for a unit test
        model = instantiate(cfg).eval()
        z = model(torch.rand(1, 3, 64, 96))
    assert model.backbone.num_features == 1280
    assert tuple(model.mapper[0].weight.shape) == (16, 1280, 1, 1) and model.mapper[0].bias is None
    assert z.shape == (1, 16, 2, 3)


def test_imagenet_normalisation_happens_inside(compressor):
    images = torch.rand(2, 3, 64, 64)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        z = compressor(images)
        by_hand = compressor.mapper(compressor.backbone.forward_features((images - mean) / std))
        unnormalised = compressor.mapper(compressor.backbone.forward_features(images))
    torch.testing.assert_close(z, by_hand)
    assert not torch.allclose(z, unnormalised, atol=1e-3)


def test_normalisation_constants_are_not_saved_as_weights(compressor):
    assert not {"mean", "std"} & set(compressor.state_dict())


def test_classifier_head_is_not_built(compressor):
    assert not any(name.startswith("backbone.classifier.") for name in compressor.state_dict())


@pytest.mark.parametrize("layout", ["file.safetensors", "dir/model.safetensors", "dir/pytorch_model.bin"])
def test_pretrained_backbone_loads_from_a_local_file_or_directory(tmp_path, layout):
    source = timm.create_model(TINY_BACKBONE).eval()  # a full model, classifier head included
    path = tmp_path / layout
    path.parent.mkdir(exist_ok=True)
    if path.suffix == ".safetensors":
        safetensors.torch.save_file(source.state_dict(), path)
    else:
        torch.save(source.state_dict(), path)
    pretrained = path if layout.startswith("file") else path.parent
    model = SemanticCompressor(backbone=TINY_BACKBONE, pretrained=str(pretrained)).eval()
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.backbone.forward_features(images), source.forward_features(images))


def test_missing_pretrained_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="pretrained path .* does not exist"):
        SemanticCompressor(backbone=TINY_BACKBONE, pretrained=str(tmp_path / "nope.safetensors"))


def test_pretrained_directory_without_weights_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds none of"):
        SemanticCompressor(backbone=TINY_BACKBONE, pretrained=str(tmp_path))


@pytest.mark.parametrize("shape", [(3, 64, 64), (2, 1, 64, 64), (2, 4, 64, 64)])
def test_rejects_images_that_are_not_b_3_h_w(compressor, shape):
    with pytest.raises(ValueError, match=r"images must be \[B, 3, H, W\]"):
        compressor(torch.rand(*shape))
