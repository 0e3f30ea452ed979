"""The acceptance check of a LoRA fine-tune: on a handful of captioned images of a word the base never
saw ("zorblat": a photo filled with one colour), the fine-tuned cascade draws it more often than the base.

Base pipelines: one ``wurst-export import`` made from random official-format checkpoints, and one of
ours (random tiny exports). A randomly initialised compressor maps every image to the same latent (its
features vanish through the stack; measured: all six colours below give one z), so each base gets a
compressor that sees colour: default init with its BatchNorm statistics set on 64 random-colour images
(the official one written into ``model_v2_stage_b.pt["effnet_state_dict"]`` before the import). Their
Stage B and A stay random, so the drawing is read where the word lives, in the semantic latent the
cascade's Stage C samples (``CascadeSampler.sample_prior``, z on the compressor's scale): a draw shows
the zorblat when its z is nearer the compressor's latent of zorblat photos than those of photos of five
other colours (chance 1/6).
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from wurst.models.hub.pipeline_dir import read_network, read_text_encoder
from wurst.train.cascade_loading import load_cascade

from .conftest import hub, hub_test_module, launch

WORD_PROMPT = "a photo of a zorblat"
ZORBLAT = (0.85, 0.15, 0.75)  # the new word's colour
OTHERS = [(0.9, 0.1, 0.1), (0.1, 0.8, 0.2), (0.1, 0.2, 0.9), (0.95, 0.9, 0.1), (0.1, 0.85, 0.85)]
DRAWS, STEPS = 48, 150


def photo(colour, seed: int) -> Image.Image:
    """A 128-px photo of one colour with mild pixel noise, as JPEG (what the folder holds)."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(colour) + rng.normal(0, 0.03, (128, 128, 3)), 0, 1)
    buffer = io.BytesIO()
    Image.fromarray((pixels * 255).astype(np.uint8)).save(buffer, format="JPEG", quality=95)
    return Image.open(buffer).convert("RGB")


def write_zorblats(folder, count: int = 12):
    folder.mkdir(parents=True)
    for i in range(count):
        photo(ZORBLAT, seed=i).save(folder / f"z{i}.jpg", quality=95)
        (folder / f"z{i}.txt").write_text(WORD_PROMPT)
    return folder


def calibrated(compressor: torch.nn.Module) -> torch.nn.Module:
    """BatchNorm statistics of 64 noisy random-colour 96-px images (cumulative average), then eval mode."""
    images = calibration_images()
    for module in compressor.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None
    with torch.no_grad():
        compressor.train()(images)
    return compressor.eval()


def calibration_images() -> torch.Tensor:
    """64 noisy random-colour 96-px images ``[64, 3, 96, 96]`` in [0, 1]."""
    generator = torch.Generator().manual_seed(0)
    colours = torch.rand(64, 3, 1, 1, generator=generator)
    return (colours + 0.1 * torch.randn(64, 3, 96, 96, generator=generator)).clamp(0, 1)


@pytest.fixture(scope="module")
def our_base(tmp_path_factory):
    from hydra.utils import instantiate

    from wurst.models.hub.pipeline_dir import write_network

    base = hub.write_tiny_pipeline(tmp_path_factory.mktemp("word_ours") / "tiny")
    config = hub.tiny_config("compressor")
    torch.manual_seed(4)
    compressor = calibrated(instantiate(config))
    write_network(base / "stage_b" / "export", "compressor", compressor.state_dict(), config)
    # Stage C's noise as in the official-format writer (std 0.05; tests/hub's 0.02 prior is one whose
    # samples 150 adapter steps do not move: measured 29% -> 25-50%).
    stage_c, config = hub.build_tiny("stage_c", seed=1, std=0.05)
    write_network(base / "stage_c" / "export", "model", stage_c.state_dict(), config)
    return base


@pytest.fixture(scope="module")
def imported_official_base(tmp_path_factory):
    official = hub_test_module("test_official_import")
    folder = official.official_folder.__wrapped__(tmp_path_factory)
    checkpoint = folder["root"] / "model_v2_stage_b.pt"
    state = torch.load(checkpoint, weights_only=True)
    torch.manual_seed(4)
    state["effnet_state_dict"] = calibrated(official.OfficialEfficientNetEncoder(hub.tiny_config("compressor"))).state_dict()
    torch.save(state, checkpoint)
    out = tmp_path_factory.mktemp("word_imported") / "pipeline"
    done = official.run_import(folder, out)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def zorblat_rate(pipeline, stage_c, text_encoder_c) -> float:
    """Share of DRAWS seeded draws of WORD_PROMPT whose Stage C latent is nearest the zorblat colour's."""
    compressor = read_network(pipeline / "stage_b" / "export", "compressor").eval()
    # Each colour's latent: the mean over 8 photos of it made like the folder's, at the compressor's 96 px.
    images = torch.stack([torch.from_numpy(np.array(photo(colour, seed=100 + i).resize((96, 96), Image.BICUBIC)))
                          for colour in (ZORBLAT, *OTHERS) for i in range(8)]).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        centroids = compressor(images).flatten(1).unflatten(0, (6, 8)).mean(dim=1)  # [6, 16·3·3]
    hand_off = json.loads((pipeline / "stage_c" / "export" / "hand_off.json").read_text())
    cascade = load_cascade(pipeline, sampler="tiny", stage_c=stage_c, text_encoder_c=text_encoder_c, hand_off=hand_off)
    with torch.no_grad():
        z = cascade.sample_prior([WORD_PROMPT] * DRAWS, 128, 128,
                                 generator=[torch.Generator().manual_seed(i) for i in range(DRAWS)])
    nearest = torch.cdist(z.flatten(1), centroids).argmin(dim=1)
    return (nearest == 0).float().mean().item()


@pytest.mark.slow
@pytest.mark.parametrize("which", ["imported_official", "ours"])
def test_the_lora_fine_tuned_cascade_draws_the_new_word_more_often_than_the_base(
    which, request, launcher, tmp_path
):
    base = request.getfixturevalue("imported_official_base" if which == "imported_official" else "our_base")
    out = tmp_path / "out"
    launch(launcher, [
        "experiment=finetune/stage_c_lora", f"finetune.base={base}", "data=image_folder",
        f"data.image_folder.path={write_zorblats(tmp_path / 'zorblats')}", f"paths.output_dir={out}",
        f"paths.data_dir={tmp_path / 'data'}", "stage.data.compressor_size=96", "data.global_batch_size=4",
        "data.num_workers=0", f"trainer.max_steps={STEPS}", f"checkpoint_every={STEPS}", "optim.lr=3.0e-3",
        "optim.warmup_steps=10", "logger=csv", "callbacks.progress_bar=false",
    ], tmp_path / "run.log")
    c_dir = base / "stage_c" / "export"
    text_encoder = read_text_encoder(c_dir)
    before = zorblat_rate(base, read_network(c_dir), text_encoder)
    after = zorblat_rate(base, read_network(out / "finetune" / "stage_c_lora" / "export"), text_encoder)
    print(f"\n{which}: '{WORD_PROMPT}' drawn as the zorblat in {before:.0%} of {DRAWS} draws before, "
          f"{after:.0%} after {STEPS} LoRA steps (chance {1 / 6:.0%})")
    # 48 seeded draws each: a gain of 12 draws or more is far outside seed noise (both rates near chance
    # before; measured: imported 15% -> 100%, ours 6% -> 58%).
    assert after >= before + 0.25
