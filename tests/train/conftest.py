"""Fixtures for the training tests: composed configs and tiny stage exports made on the spot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from wurst.train.config import CONFIG_DIR
from wurst.train.export import write_network, write_provenance

REPO = Path(CONFIG_DIR).parent


def compose_train(overrides: list[str]):
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def tiny_network_config(group: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(Path(CONFIG_DIR) / "model" / group / "tiny.yaml"), resolve=True)


def write_tiny_export(export_dir: Path, stage: str) -> Path:
    """A randomly initialised tiny export of Stage A, or Stage B's compressor + text encoder."""
    torch.manual_seed(0)
    if stage == "a":
        cfg = tiny_network_config("stage_a")
        write_network(export_dir, "model", instantiate(cfg), cfg)
    elif stage == "b":
        for name, group in (("model", "stage_b"), ("compressor", "compressor"), ("text_encoder", "text_encoder")):
            cfg = tiny_network_config(group)
            write_network(export_dir, name, instantiate(cfg), cfg)
    write_provenance(export_dir, {"stage": stage, "made_by": "tests/train/conftest.py"})
    return export_dir


@pytest.fixture
def tiny_pipeline_dir(tmp_path) -> Path:
    """outputs/<group> with random tiny Stage A and Stage B exports (what Stage B / C consume)."""
    root = tmp_path / "tiny"
    write_tiny_export(root / "stage_a" / "export", "a")
    write_tiny_export(root / "stage_b" / "export", "b")
    return root


@pytest.fixture
def synthetic_batch():
    """A fixed batch of synthetic 128-px shapes (images, 96-px compressor images, captions)."""
    import random

    from torchvision.transforms.functional import pil_to_tensor, resize

    from wurst.data.synthetic import synthetic_image

    rng = random.Random(0)
    images, captions = [], []
    for _ in range(8):
        image, caption = synthetic_image(rng, 128, 128)
        images.append(pil_to_tensor(image).float() / 255)
        captions.append(caption)
    images = torch.stack(images)
    return {"images": images, "compressor_images": resize(images, [96, 96], antialias=True), "captions": captions}


def dump(obj) -> str:
    return json.dumps(obj, indent=2, default=str)
