"""The latent cache: cached shards reproduce the frozen encoders' outputs, and caching resumes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from wurst.data.cli import main
from wurst.data.laion_filter import LAIONFilter
from wurst.data.latent_cache import EMPTY_TEXT, cache_shards, load_encoder
from wurst.data.shard_stream import CachedShardStream, ImageShardStream
from wurst.data.stream_loader import StreamLoader

from .conftest import CONF_DIR

COMPRESSOR = {"_target_": "toy_encoders.ToyCompressor"}
TEXT_ENCODER = {"_target_": "toy_encoders.ToyTextEncoder", "width": 8}


@pytest.fixture
def toy_configs(monkeypatch, tmp_path):
    """Encoder configs as Hydra would see them: one as a yaml file, one as a mapping."""
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    torch.manual_seed(0)
    compressor_yaml = tmp_path / "compressor.yaml"
    compressor_yaml.write_text("_target_: toy_encoders.ToyCompressor\n")
    compressor = load_encoder(compressor_yaml)
    weights = tmp_path / "compressor.safetensors"
    from safetensors.torch import save_file

    save_file(compressor.state_dict(), str(weights))
    return compressor_yaml, weights, TEXT_ENCODER


@pytest.fixture
def cache(clean_shards, toy_configs, tmp_path):
    folder, _ = clean_shards
    compressor_yaml, weights, text = toy_configs
    out = tmp_path / "cache"
    summary = cache_shards(str(folder), out, compressor_yaml, text, compressor_weights=weights, resolution=96,
                           compressor_resolution=64, laion_filter=LAIONFilter(), batch_size=8, num_workers=2)
    return out, summary


def test_cached_shards_hold_the_encoder_outputs_of_the_same_samples(clean_shards, toy_configs, cache):
    folder, _ = clean_shards
    compressor_yaml, weights, text = toy_configs
    compressor, text_encoder = load_encoder(compressor_yaml, weights), load_encoder(text)
    images = ImageShardStream(str(folder), 8, mode="finite", shuffle=False, resolution=96, compressor_resolution=64,
                              random_crop=False, laion_filter=LAIONFilter())
    expected = {}
    for batch in StreamLoader(images):
        latents, hidden = compressor(batch["compressor_images"]), text_encoder(batch["captions"])[0]
        expected.update({k: (latents[i], hidden[i]) for i, k in enumerate(batch["keys"])})
    cached = CachedShardStream(str(cache[0]), 8, mode="finite", shuffle=False)
    seen = 0
    for batch in StreamLoader(cached):
        assert batch["compressor_latents"].shape[1:] == (16, 2, 2) and batch["text_hidden"].shape[1:] == (77, 8)
        for i, key in enumerate(batch["keys"]):
            latents, hidden = expected[key]
            torch.testing.assert_close(batch["compressor_latents"][i], latents, rtol=1e-3, atol=1e-3)  # fp16
            torch.testing.assert_close(batch["text_hidden"][i], hidden, rtol=1e-3, atol=1e-3)
            seen += 1
    assert seen == len(expected) == 112


def test_the_cache_stores_fp16_and_the_empty_caption_states(cache):
    out, summary = cache
    assert summary["shards_written"] == 8 and summary["counts"]["samples_accepted"] == 112
    empty = np.load(out / EMPTY_TEXT)
    assert empty.dtype == np.float16 and empty.shape == (77, 8)
    assert json.loads((out / "cache_info.json").read_text())["dtype"] == "float16"


def test_caching_resumes_skipping_finished_shards_and_redoing_a_half_written_one(clean_shards, toy_configs, cache):
    folder, _ = clean_shards
    out, _ = cache
    compressor_yaml, weights, text = toy_configs
    finished = (out / "00003.tar").read_bytes()
    (out / "00003.tar").unlink()
    (out / "00003.tar.tmp0").write_bytes(b"half a shard from a killed run")
    summary = cache_shards(str(folder), out, compressor_yaml, text, compressor_weights=weights, resolution=96,
                           compressor_resolution=64, laion_filter=LAIONFilter(), batch_size=8, num_workers=0)
    assert summary["shards_already_done"] == 7 and summary["shards_written"] == 1
    assert (out / "00003.tar").read_bytes() == finished
    assert not (out / "00003.tar.tmp0").exists()


def test_wrong_encoder_configs_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="has no _target_"):
        load_encoder({"backbone": "x"})
    with pytest.raises(FileNotFoundError, match="compressor.safetensors"):
        load_encoder({"_target_": "torch.nn.Identity"}, weights=tmp_path / "missing.safetensors")


def test_the_cache_command_runs_from_the_cli(clean_shards, toy_configs, tmp_path):
    folder, _ = clean_shards
    compressor_yaml, weights, _ = toy_configs
    code = main(["cache", "--shards", f"{folder}/{{00000..00001}}.tar", "--out", str(tmp_path / "cli-cache"),
                 "--compressor", str(compressor_yaml), "--compressor-weights", str(weights),
                 "--text-encoder", json.dumps(TEXT_ENCODER), "--resolution", "64", "--compressor-resolution", "32",
                 "--batch-size", "4", "--num-workers", "0", "--device", "cpu"])
    assert code == 0 and sorted(p.name for p in (tmp_path / "cli-cache").glob("*.tar")) == ["00000.tar", "00001.tar"]


@pytest.mark.slow
def test_the_tiny_model_configs_cache_through_the_same_path(clean_shards, tmp_path):
    compressor_yaml = CONF_DIR / "model" / "compressor" / "tiny.yaml"
    text_yaml = CONF_DIR / "model" / "text_encoder" / "tiny.yaml"
    folder, _ = clean_shards
    out = tmp_path / "tiny-cache"
    torch.manual_seed(1)  # the tiny encoders are randomly initialised: same seed, same encoders below
    cache_shards(f"{folder}/00000.tar", out, compressor_yaml, text_yaml, resolution=128, compressor_resolution=96,
                 laion_filter=LAIONFilter(), batch_size=8, num_workers=0, device="cpu")
    torch.manual_seed(1)
    compressor, text_encoder = load_encoder(compressor_yaml), load_encoder(text_yaml)
    cached = next(iter(StreamLoader(CachedShardStream(str(out), 4, mode="finite", shuffle=False))))
    assert cached["compressor_latents"].shape[1:] == (16, 3, 3)  # contract: compressor at 96 px -> 16x3x3
    assert cached["text_hidden"].shape[1:] == (77, 64)  # contract: tiny text width 64
    images = ImageShardStream(f"{folder}/00000.tar", 4, mode="finite", shuffle=False, resolution=128,
                              compressor_resolution=96, random_crop=False, laion_filter=LAIONFilter())
    batch = next(iter(StreamLoader(images)))
    assert batch["keys"] == cached["keys"]
    latents = compressor(batch["compressor_images"])
    hidden = text_encoder(batch["captions"])[0]
    torch.testing.assert_close(cached["compressor_latents"], latents, rtol=2e-3, atol=2e-3)  # fp16 storage
    torch.testing.assert_close(cached["text_hidden"], hidden, rtol=2e-3, atol=2e-3)
