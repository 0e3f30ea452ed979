"""Fixtures of the evaluation tests: tiny metric models built here, a fake COCO, colour images.

Nothing is downloaded. The metric networks are the real classes with tiny or random weights:
- Inception: torch-fidelity's ``FeatureExtractorInceptionV3`` at its fixed size, randomly initialised
  (He init, so activations keep their scale and features respond to the input) and saved as a
  weights file, which the metric modules load through their ``weights`` path.
- CLIP (transformers and open_clip) and PickScore: tiny CLIP models with the real 49,408-token BPE
  vocabulary, fitted for a few contrastive steps on :data:`COLOURS` (a solid-colour image per caption
  "a photo of a red square", ...). That is how they come to rank a matching caption above a mismatched
  one; they are saved to folders that the metric modules load like downloaded checkpoints.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from torch import nn

from wurst.models.hub.clip_tokenizer import write_clip_tokenizer

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 200, 40),
    "blue": (30, 40, 220),
    "yellow": (230, 220, 30),
    "black": (10, 10, 10),
    "white": (245, 245, 245),
}
CONF = Path(__file__).resolve().parents[2] / "conf"


def caption_of(colour: str) -> str:
    return f"a photo of a {colour} square"


def colour_image(colour: str, size: int = 48, seed: int = 0) -> Image.Image:
    """A ``size``² image of ``colour`` with mild pixel noise (seeded)."""
    rng = np.random.default_rng(seed)
    pixels = np.array(COLOURS[colour], dtype=np.float32) + rng.normal(0, 12, (size, size, 3))
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


@contextmanager
def one_thread():
    """One intra-op thread for these tiny models: on a shared 2-core CPU, thread oversubscription makes
    them 10-100x slower than the work itself. Restored afterwards, so other test areas are unaffected."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def _fit_contrastive(step_loss, parameters, steps: int = 60, lr: float = 3e-3) -> None:
    optimiser = torch.optim.Adam(parameters, lr=lr)
    with one_thread():
        for _ in range(steps):
            optimiser.zero_grad()
            loss = step_loss()
            loss.backward()
            optimiser.step()


# ----- Inception ---------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory) -> Path:
    """A weights file of torch-fidelity's InceptionV3 with random (He) weights."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class RandomInception(FeatureExtractorInceptionV3):
        # The real class always loads a state dict; an empty one leaves PyTorch's initialisation.
        def load_state_dict(self, state_dict, strict=True, assign=False):
            return super().load_state_dict(state_dict, strict=False, assign=assign)

    folder = tmp_path_factory.mktemp("inception")
    torch.save({}, folder / "empty.pt")
    torch.manual_seed(0)
    network = RandomInception(
        "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(folder / "empty.pt")
    )
    for module in network.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    (folder / "empty.pt").unlink()
    path = folder / "weights-inception-2015-12-05-6726825d.pth"
    torch.save(network.state_dict(), path)
    return path


# ----- CLIP models -------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def clip_tokenizer_dir(tmp_path_factory) -> Path:
    return write_clip_tokenizer(tmp_path_factory.mktemp("clip_tokenizer"))


@pytest.fixture(scope="session")
def colour_pairs() -> tuple[list[Image.Image], list[str]]:
    return [colour_image(c, seed=i) for i, c in enumerate(COLOURS)], [caption_of(c) for c in COLOURS]


@pytest.fixture(scope="session")
def tiny_transformers_clip(tmp_path_factory, clip_tokenizer_dir, colour_pairs) -> dict[str, Path]:
    """``{"model": dir, "processor": dir}`` of a tiny transformers CLIP fitted to the colour pairs.

    The model folder also holds the processor files (as Hub CLIP repos do); PickScore's tests load the
    processor from the separate folder, as PickScore takes it from another repository."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(clip_tokenizer_dir)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    config = CLIPConfig(
        text_config={
            "vocab_size": 49408,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 77,
            "eos_token_id": 49407,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=16,
    )
    torch.manual_seed(0)
    model = CLIPModel(config)
    images, captions = colour_pairs
    inputs = processor(text=captions, images=images, padding=True, return_tensors="pt")
    _fit_contrastive(lambda: model(**inputs, return_loss=True).loss, model.parameters())
    root = tmp_path_factory.mktemp("transformers_clip")
    model.eval().save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    processor.save_pretrained(root / "processor")
    return {"model": root / "model", "processor": root / "processor"}


@pytest.fixture(scope="session")
def tiny_open_clip_dir(tmp_path_factory, colour_pairs) -> Path:
    """A ``local-dir:`` open_clip folder (open_clip_config.json + weights) fitted to the colour pairs."""
    import open_clip
    from safetensors.torch import save_file

    model_cfg = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    torch.manual_seed(0)
    model = open_clip.CLIP(**model_cfg)
    preprocess = open_clip.image_transform(32, is_train=False)
    images, captions = colour_pairs
    pixels = torch.stack([preprocess(image) for image in images])
    tokens = open_clip.tokenize(captions)

    def loss() -> torch.Tensor:
        image = nn.functional.normalize(model.encode_image(pixels), dim=-1)
        text = nn.functional.normalize(model.encode_text(tokens), dim=-1)
        logits = model.logit_scale.exp() * image @ text.T
        labels = torch.arange(len(captions))
        return (
            nn.functional.cross_entropy(logits, labels) + nn.functional.cross_entropy(logits.T, labels)
        ) / 2

    _fit_contrastive(loss, model.parameters())
    folder = tmp_path_factory.mktemp("open_clip")
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": {}}))
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(folder / "open_clip_model.safetensors"),
    )
    return folder


# ----- COCO --------------------------------------------------------------------------------------
@pytest.fixture
def fake_coco(tmp_path) -> dict[str, Path]:
    """A captions_val2014.json with 12 captioned images (+1 whose only caption is blank) and val2014/."""
    images_dir = tmp_path / "val2014"
    images_dir.mkdir()
    colours = list(COLOURS)
    images, annotations = [], []
    for i in range(13):
        image_id = 1000 + 7 * i
        name = f"COCO_val2014_{image_id:012d}.jpg"
        width, height = (64 + 8 * (i % 3), 48 + 8 * (i % 2))  # non-square, as COCO's are
        colour_image(colours[i % len(colours)], size=max(width, height), seed=i).crop(
            (0, 0, width, height)
        ).save(images_dir / name)
        images.append({"id": image_id, "file_name": name, "width": width, "height": height})
        captions = (
            ["   "]
            if i == 12
            else [f"A {colours[i % len(colours)]} thing number {i}. \n", f"Another view {i}"]
        )
        for caption in captions:
            annotations.append({"id": 50_000 + len(annotations), "image_id": image_id, "caption": caption})
    annotations_path = tmp_path / "captions_val2014.json"
    annotations_path.write_text(json.dumps({"info": {}, "images": images, "annotations": annotations}))
    return {"annotations": annotations_path, "images": images_dir}


# ----- the real tiny cascade ---------------------------------------------------------------------
def build_tiny_networks() -> dict[str, nn.Module]:
    """Our Stage A/B/C and two text encoders from conf/model/*/tiny.yaml, randomly initialised."""
    from hydra.utils import instantiate

    torch.manual_seed(0)
    networks = {
        name: instantiate(OmegaConf.load(CONF / "model" / name / "tiny.yaml"))
        for name in ("stage_a", "stage_b", "stage_c")
    }
    for stage in ("b", "c"):
        networks[f"text_encoder_{stage}"] = instantiate(
            OmegaConf.load(CONF / "model" / "text_encoder" / "tiny.yaml")
        )
    return {name: network.eval() for name, network in networks.items()}


@pytest.fixture(scope="session")
def tiny_cascade():
    """models.cascade.CascadeSampler over the tiny networks with conf/sampler/tiny.yaml settings."""
    from wurst.models.cascade import CascadeSampler
    from wurst.train.cascade_loading import sampler_config

    networks = build_tiny_networks()
    return CascadeSampler(**networks, **sampler_config("tiny"))


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory):
    """A pipeline directory with random-init tiny Stage A/B/C exports (train.export's layout)."""
    from wurst.train.export import write_network, write_provenance

    root = tmp_path_factory.mktemp("pipeline")
    networks = build_tiny_networks()
    for stage in ("a", "b", "c"):
        export = root / f"stage_{stage}" / "export"
        config = OmegaConf.to_container(OmegaConf.load(CONF / "model" / f"stage_{stage}" / "tiny.yaml"))
        write_network(export, "model", networks[f"stage_{stage}"], config)
        if stage in ("b", "c"):
            text_config = OmegaConf.to_container(
                OmegaConf.load(CONF / "model" / "text_encoder" / "tiny.yaml")
            )
            write_network(export, "text_encoder", networks[f"text_encoder_{stage}"], text_config)
        write_provenance(export, {"note": "random weights for the wurst-eval tests"})
    return root
