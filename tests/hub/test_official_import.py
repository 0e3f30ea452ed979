"""``wurst-export import`` on the released .pt checkpoints (vqgan_f4_v1_500k.pt, model_v2_stage_b.pt,
model_v3_stage_c.pt), written here with random weights in the official format.

The official format is built from the classes that define it, not from ours: diffusers' Würstchen
networks (the official ones under diffusers' names; the authors' attention is ``nn.MultiheadAttention``,
so q/k/v are stacked into ``attn.in_proj_*`` and the output is ``attn.out_proj``, and Stage A's codebook
is ``vquantizer.codebook`` — the two renames diffusers' conversion script undoes), torchvision's
EfficientNet for the compressor (``backbone`` = its ``features``, then ``mapper``), and open_clip's
CLIP for the text encoders the checkpoints do not hold.
"""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch
import torchvision
import yaml
from diffusers.pipelines.deprecated.wuerstchen import PaellaVQModel, WuerstchenDiffNeXt, WuerstchenPrior
from safetensors.torch import load_file
from torch import nn

from wurst.models.hub.pipeline_dir import read_network, read_text_encoder

from .conftest import randomise, tiny_config

BIN = Path(sys.executable).parent
TEXT_CFG = {"width": 64, "layers": 2, "heads": 2, "context_length": 77, "vocab_size": 49408}
BLOCKS = {"fused": torchvision.models.efficientnet.FusedMBConvConfig, "mb": torchvision.models.efficientnet.MBConvConfig}


def diffusers_network(cls: type[nn.Module], group: str, seed: int) -> nn.Module:
    names = set(inspect.signature(cls.__init__).parameters)
    kwargs = {k: v for k, v in tiny_config(group).items() if k in names}
    torch.manual_seed(seed)
    return randomise(cls(**kwargs), seed, std=0.05)


def official_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers' names → the authors' (nn.MultiheadAttention, Paella's codebook)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if ".to_q." in key:
            kind = key.rsplit(".", 1)[1]
            stem = key.split(".to_q.")[0]
            out[f"{stem}.attn.in_proj_{kind}"] = torch.cat(
                [state[f"{stem}.to_q.{kind}"], state[f"{stem}.to_k.{kind}"], state[f"{stem}.to_v.{kind}"]]
            )
        elif ".to_k." in key or ".to_v." in key:
            continue
        elif ".to_out.0." in key:
            out[key.replace(".to_out.0.", ".attn.out_proj.")] = value
        elif key == "vquantizer.embedding.weight":
            out["vquantizer.codebook.weight"] = value
        else:
            out[key] = value
    return out


class OfficialEfficientNetEncoder(nn.Module):
    """The authors' compressor layout on torchvision's EfficientNet, with conf/model/compressor/tiny.yaml's
    small inverted-residual table instead of efficientnet_v2_s's (same classes, same key names)."""

    def __init__(self, conf: dict):
        super().__init__()
        setting = [BLOCKS[b](float(e), int(k), int(s), int(i), int(o), int(n)) for b, e, k, s, i, o, n in conf["stages"]]
        network = torchvision.models.efficientnet.EfficientNet(setting, dropout=0.0, last_channel=conf["last_channel"],
                                                               norm_layer=lambda c: nn.BatchNorm2d(c, eps=conf["norm_eps"]))
        self.backbone = network.features
        self.mapper = nn.Sequential(nn.Conv2d(conf["last_channel"], conf["c_latent"], 1, bias=False),
                                    nn.BatchNorm2d(conf["c_latent"]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x ImageNet-normalised, as the official script feeds it
        return self.mapper(self.backbone(x))


@pytest.fixture(scope="module")
def official_folder(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("released")
    vqgan = diffusers_network(PaellaVQModel, "stage_a", seed=1)
    decoder = diffusers_network(WuerstchenDiffNeXt, "stage_b", seed=2)
    prior = diffusers_network(WuerstchenPrior, "stage_c", seed=3)
    torch.manual_seed(4)
    effnet = randomise(OfficialEfficientNetEncoder(tiny_config("compressor")), seed=4, std=0.05)
    torch.save({"state_dict": official_names(vqgan.state_dict())}, root / "vqgan_f4_v1_500k.pt")
    torch.save(
        {"state_dict": official_names(decoder.state_dict()), "effnet_state_dict": effnet.state_dict(),
         "optimizer_state_dict": {}, "iter": 457000},
        root / "model_v2_stage_b.pt",
    )
    torch.save({"ema_state_dict": official_names(prior.state_dict()), "state_dict": {}}, root / "model_v3_stage_c.pt")
    # The text encoders come from open_clip checkpoints on disk (what an offline cluster has).
    configs = {}
    for stage, seed in (("b", 5), ("c", 6)):
        torch.manual_seed(seed)
        clip = open_clip.CLIP(embed_dim=64, vision_cfg={"image_size": 32, "patch_size": 16, "width": 64, "layers": 1,
                                                        "head_width": 32}, text_cfg=TEXT_CFG)
        torch.save({"state_dict": clip.state_dict()}, root / f"clip_{stage}.pt")
        config = {"_target_": "wurst.models.text_encoder.TextEncoder", "model_name": f"clip-{stage}",
                  "pretrained": str(root / f"clip_{stage}.pt"), "model_cfg": {"embed_dim": 64, "text_cfg": TEXT_CFG},
                  "context_length": 77, "pad_token_id": 49407}
        configs[stage] = root / f"text_encoder_{stage}.yaml"
        configs[stage].write_text(yaml.safe_dump(config))
    return {"root": root, "vqgan": vqgan, "decoder": decoder, "prior": prior, "effnet": effnet, "text": configs}


def run_import(official_folder, out: Path, *extra: str) -> subprocess.CompletedProcess:
    argv = [str(BIN / "wurst-export"), "import", str(official_folder["root"]), f"out={out}",
            "stage_a=tiny", "stage_b=tiny", "stage_c=tiny", "compressor=tiny",
            f"text_encoder_b={official_folder['text']['b']}", f"text_encoder_c={official_folder['text']['c']}", *extra]
    return subprocess.run(argv, check=False, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def imported(official_folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("imported") / "pipeline"
    done = run_import(official_folder, out)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_the_import_holds_every_stage_and_the_compressor(imported):
    export_b = imported / "stage_b" / "export"
    assert {"model.safetensors", "compressor.safetensors", "compressor_config.json",
            "text_encoder_config.json", "provenance.json"} <= {p.name for p in export_b.iterdir()}
    assert json.loads((imported / "pipeline.json").read_text())["format"] == "official checkpoints"
    assert json.loads((imported / "stage_c" / "export" / "hand_off.json").read_text()) == {
        "latent_mean": 42.0, "latent_std": 1.0}


@pytest.mark.parametrize("stage,network", [("a", "vqgan"), ("b", "decoder"), ("c", "prior")])
def test_imported_stage_weights_are_the_official_ones_under_diffusers_names(imported, official_folder, stage, network):
    ours = load_file(str(imported / f"stage_{stage}" / "export" / "model.safetensors"))
    theirs = official_folder[network].state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_the_imported_compressor_computes_the_official_encoders_latents(imported, official_folder):
    compressor = read_network(imported / "stage_b" / "export", "compressor")
    images = torch.rand(2, 3, 96, 96)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = official_folder["effnet"].eval()((images - mean) / std)
        assert (compressor(images) - expected).abs().max() < 1e-5


def test_the_text_encoders_load_from_the_configs_pretrained_weights(imported, official_folder):
    encoder = read_text_encoder(imported / "stage_c" / "export")
    clip = open_clip.CLIP(embed_dim=64, vision_cfg={"image_size": 32, "patch_size": 16, "width": 64, "layers": 1,
                                                    "head_width": 32}, text_cfg=TEXT_CFG)
    clip.load_state_dict(torch.load(official_folder["root"] / "clip_c.pt", weights_only=True)["state_dict"])
    tokens = encoder.tokenize(["a red circle on a blue background"])
    with torch.no_grad():
        assert (encoder(["a red circle on a blue background"])[1] - clip.encode_text(tokens)).abs().max() < 1e-5


@pytest.mark.slow
def test_wurst_generate_draws_from_the_imported_directory(imported, tmp_path):
    done = subprocess.run(
        [str(BIN / "wurst-generate"), str(imported), "--prompt", "a red circle on a blue background",
         "--out", str(tmp_path / "images"), "--height", "128", "--width", "128", "--sampler", "tiny"],
        check=False, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(list((tmp_path / "images").glob("*.png"))) == 1


def test_a_checkpoint_without_its_key_names_file_and_key(official_folder, tmp_path):
    broken = tmp_path / "released"
    broken.mkdir()
    for name in ("vqgan_f4_v1_500k.pt", "model_v2_stage_b.pt"):
        (broken / name).write_bytes((official_folder["root"] / name).read_bytes())
    torch.save({"state_dict": {}}, broken / "model_v3_stage_c.pt")  # no ema_state_dict
    done = run_import({**official_folder, "root": broken}, tmp_path / "out")
    assert done.returncode == 1
    assert "model_v3_stage_c.pt has no 'ema_state_dict'" in done.stderr
    assert not (tmp_path / "out").exists()


def test_configs_that_do_not_fit_the_weights_are_refused_naming_the_file(official_folder, tmp_path):
    done = run_import(official_folder, tmp_path / "out", "stage_c=paper")
    assert done.returncode == 1 and "model_v3_stage_c.pt" in done.stderr and "do not fit" in done.stderr
    assert not (tmp_path / "out").exists()
