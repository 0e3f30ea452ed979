"""Semantic compressor: z = BatchNorm(1×1 conv(EfficientNet features of ImageNet-normalised images)), in the
official layout: tested against the official module (torchvision classes, random weights) and the official
checkpoint format, not against ourselves."""

from __future__ import annotations

from pathlib import Path

import pytest
import safetensors.torch
import torch
import torchvision
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn
from torchvision.models._api import WeightsEnum

from wurst.models.hub.pipeline_dir import build_network
from wurst.models.semantic_compressor import SemanticCompressor


def _build(conf: dict) -> SemanticCompressor:
    """The class itself, so that errors reach the test unwrapped by Hydra."""
    return SemanticCompressor(**{k: v for k, v in conf.items() if k != "_target_"})


def _shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in module.state_dict().items()}


@pytest.fixture(scope="module")
def torchvision_v2_s() -> nn.Module:
    """torchvision's full efficientnet_v2_s classifier (random weights): what a downloaded .pth holds."""
    generator = torch.Generator().manual_seed(5)
    model = torchvision.models.efficientnet_v2_s().eval()
    with torch.no_grad():  # non-default BatchNorm statistics, so that a load that skipped them shows
        for name, tensor in model.state_dict().items():
            if name.endswith("running_mean"):
                tensor.copy_(torch.rand(tensor.shape, generator=generator))
            elif name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
    return model


# ----- the official layout ------------------------------------------------------------------------------
def test_paper_config_state_dict_has_the_official_keys_and_shapes(compressor_conf, official_encoder):
    with torch.device("meta"):  # keys and shapes only
        ours = instantiate(compressor_conf("paper"))
        official = official_encoder()
    assert _shapes(ours) == _shapes(official)


def test_paper_compressor_equals_the_official_module_on_the_same_weights(
    compressor_conf, official_compressor, official_preprocess
):
    ours = instantiate(compressor_conf("paper")).eval()
    ours.load_state_dict(official_compressor.state_dict(), strict=True)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        z, expected = ours(images), official_compressor(official_preprocess(images))
        unnormalised = official_compressor(images)
    assert z.shape == (2, 16, 2, 2)
    torch.testing.assert_close(z, expected, atol=1e-5, rtol=0)
    # The comparison means something: the latent depends on the image and on the normalisation.
    assert (expected[0] - expected[1]).abs().max() > 1e-2
    assert (unnormalised - expected).abs().max() > 1e-2


def test_a_file_in_the_official_checkpoint_format_loads_strictly(
    tmp_path, compressor_conf, official_compressor
):
    path = tmp_path / "model_v2_stage_b.pt"
    torch.save(
        {
            "effnet_state_dict": official_compressor.state_dict(),
            "state_dict": {"clf.0.weight": torch.zeros(2)},
            "iter": 1,
            "wandb_run_id": "abc",
        },
        path,
    )
    ours = instantiate(compressor_conf("paper")).load_official_state_dict(path)
    loaded = ours.state_dict()
    for name, tensor in official_compressor.state_dict().items():
        assert torch.equal(loaded[name], tensor), name


def test_official_checkpoint_is_read_without_unpickling_code(tmp_path, tiny_compressor):
    path = tmp_path / "model_v2_stage_b.pt"
    torch.save(
        {"effnet_state_dict": {}, "optimizer": nn.Identity()}, path
    )  # a pickled module: code, not data
    with pytest.raises(Exception, match="(?i)weights.only|unpickl"):
        tiny_compressor.load_official_state_dict(path)


def test_a_checkpoint_without_effnet_state_dict_is_a_clear_error(tmp_path, tiny_compressor):
    path = tmp_path / "stage_b.pt"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(ValueError, match=r"no 'effnet_state_dict' .*model_v2_stage_b\.pt"):
        tiny_compressor.load_official_state_dict(path)


def test_syncbatchnorm_conversion_reaches_every_batchnorm_and_keeps_keys_and_output(
    tiny_compressor, compressor_conf
):
    """The official Stage B script converts the whole (compressor + generator) wrapper to SyncBatchNorm."""
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(instantiate(compressor_conf("tiny"))).eval()
    converted.load_state_dict(tiny_compressor.state_dict())
    norms = [m for m in converted.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert norms and all(type(m) is nn.SyncBatchNorm for m in norms)
    assert (
        type(converted.mapper[1]) is nn.SyncBatchNorm
        and converted.mapper[1].eps == tiny_compressor.mapper[1].eps
    )
    assert _shapes(converted) == _shapes(tiny_compressor)
    images = torch.rand(2, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(converted(images), tiny_compressor(images), atol=1e-6, rtol=0)


# ----- ImageNet initialisation ------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["full.pth", "features.pth", "dir/efficientnet_v2_s-dd5fe13b.pth"])
def test_pretrained_from_a_local_torchvision_file_works_offline(
    tmp_path, monkeypatch, compressor_conf, torchvision_v2_s, layout
):
    def no_network(*args, **kwargs):
        raise AssertionError("a local pretrained path must not touch the network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    path = tmp_path / layout
    path.parent.mkdir(exist_ok=True)
    state = (
        torchvision_v2_s.state_dict() if "features" not in layout else torchvision_v2_s.features.state_dict()
    )
    if path.suffix == ".safetensors":
        safetensors.torch.save_file(state, path)
    else:
        torch.save(state, path)
    pretrained = path.parent if layout.startswith("dir/") else path
    ours = instantiate(compressor_conf("paper", pretrained=str(pretrained)))
    assert _shapes(ours.backbone) == _shapes(torchvision_v2_s.features)
    for name, tensor in torchvision_v2_s.features.state_dict().items():
        assert torch.equal(ours.backbone.state_dict()[name], tensor), name


def test_pretrained_true_loads_torchvisions_imagenet_weights(monkeypatch, compressor_conf, torchvision_v2_s):
    fetched = []

    def fake_fetch(self, *args, **kwargs):
        fetched.append(self.url)
        return torchvision_v2_s.state_dict()

    monkeypatch.setattr(WeightsEnum, "get_state_dict", fake_fetch)
    ours = instantiate(compressor_conf("paper", pretrained=True))
    assert fetched == [torchvision.models.EfficientNet_V2_S_Weights.IMAGENET1K_V1.url]
    torch.testing.assert_close(
        ours.backbone.state_dict(), torchvision_v2_s.features.state_dict(), atol=0, rtol=0
    )


@pytest.mark.parametrize("env", [None, "/weights/efficientnet_v2_s-dd5fe13b.pth"])
def test_paper_config_takes_local_imagenet_weights_from_wurst_effnet_weights(monkeypatch, env):
    """Unset: torchvision fetches (or finds in $TORCH_HOME) its ImageNet weights; set: the local file."""
    if env is None:
        monkeypatch.delenv("WURST_EFFNET_WEIGHTS", raising=False)
    else:
        monkeypatch.setenv("WURST_EFFNET_WEIGHTS", env)
    conf = OmegaConf.load(Path(__file__).resolve().parents[2] / "conf/model/compressor/paper.yaml")
    assert conf.pretrained == (True if env is None else env)


# ----- bad inputs -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tf_efficientnetv2_s", "test_efficientnet"])
def test_a_timm_backbone_from_an_old_config_is_refused_with_the_fix(name):
    with pytest.raises(
        ValueError, match=rf"backbone='{name}' is a timm .*format changed.*wurst-train stage=b"
    ):
        SemanticCompressor(backbone=name, pretrained=False, c_latent=16)


def test_an_old_export_with_a_timm_compressor_is_refused_at_load():
    old_config = {
        "_target_": "wurst.models.semantic_compressor.SemanticCompressor",
        "backbone": "test_efficientnet",
        "pretrained": False,
        "c_latent": 16,
    }
    with pytest.raises(
        ValueError, match=r"format changed.*retrain Stage B .*wurst-train stage=b experiment=tiny"
    ):
        build_network(
            old_config, {"mapper.0.weight": torch.zeros(16, 256, 1, 1)}, "stage_b/export/compressor"
        )


def test_a_missing_pretrained_path_names_it_and_the_fix(tmp_path, compressor_conf):
    missing = tmp_path / "efficientnet_v2_s.pth"
    with pytest.raises(FileNotFoundError, match=rf"pretrained path {missing} does not exist.*torchvision"):
        _build(compressor_conf("tiny", pretrained=str(missing)))


def test_a_pretrained_directory_without_weights_names_what_it_looked_for(tmp_path, compressor_conf):
    with pytest.raises(FileNotFoundError, match=r"holds none of .*efficientnet_v2_s-dd5fe13b\.pth"):
        _build(compressor_conf("tiny", pretrained=str(tmp_path)))


def test_imagenet_weights_for_another_stage_table_are_a_clear_error(
    tmp_path, compressor_conf, torchvision_v2_s
):
    path = tmp_path / "efficientnet_v2_s.pth"
    torch.save(torchvision_v2_s.state_dict(), path)
    with pytest.raises(ValueError, match=r"do not fit this backbone.*paper\.yaml.*pretrained: false"):
        _build(compressor_conf("tiny", pretrained=str(path)))


@pytest.mark.parametrize(
    "stages, match",
    [
        ([["fused", 1, 3, 2, 16, 16, 1]], "total stride of 4"),
        ([["mb", 4, 3, 2, 16, 20, 1]] * 1, "not multiples of 8"),
        (
            [["fused", 1, 3, 2, 16, 24, 1], ["fused", 1, 3, 2, 16, 24, 1]],
            r"takes 16 channels but stages\[0\] gives 24",
        ),
        ([["conv", 1, 3, 2, 16, 16, 1]], "block 'conv' is not one of"),
    ],
)
def test_a_bad_stage_table_is_a_clear_error(compressor_conf, stages, match):
    with pytest.raises(ValueError, match=match):
        _build(compressor_conf("tiny", stages=stages))


@pytest.mark.parametrize("shape", [(3, 64, 64), (2, 1, 64, 64), (2, 4, 64, 64)])
def test_rejects_images_that_are_not_b_3_h_w(tiny_compressor, shape):
    with pytest.raises(ValueError, match=r"images must be \[B, 3, H, W\]"):
        tiny_compressor(torch.rand(*shape))


# ----- the tiny config and what every config shares ----------------------------------------------------
def test_tiny_config_maps_96px_images_to_16x3x3(tiny_compressor):
    with torch.no_grad():
        assert tiny_compressor(torch.rand(2, 3, 96, 96)).shape == (2, 16, 3, 3)


@pytest.mark.parametrize("size", [(64, 128), (384, 384)])
def test_latent_is_16_channels_at_a_32nd_of_the_image_side(tiny_compressor, size):
    h, w = size
    with torch.no_grad():
        assert tiny_compressor(torch.rand(1, 3, h, w)).shape == (1, 16, h // 32, w // 32)


def test_tiny_backbone_is_built_from_torchvisions_efficientnet_blocks(tiny_compressor):
    from torchvision.models.efficientnet import FusedMBConv, MBConv

    kinds = {type(m) for m in tiny_compressor.backbone.modules()}
    assert FusedMBConv in kinds and MBConv in kinds
    assert {name.split(".")[0] for name in tiny_compressor.state_dict()} == {"backbone", "mapper"}


def test_normalisation_constants_are_not_saved_as_weights(tiny_compressor):
    assert not {"mean", "std"} & set(tiny_compressor.state_dict())
