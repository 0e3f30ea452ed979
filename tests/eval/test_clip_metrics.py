"""CLIP score (transformers and open_clip) and PickScore on tiny real models loaded from folders.

The tiny models were fitted for a few contrastive steps on solid-colour images and their captions
(conftest), so a working metric must rank each image's own caption above the others.
"""

from __future__ import annotations

import pytest
import torch

from wurst.eval.clip_score import ClipScore
from wurst.eval.pickscore import PickScore, preference


def rolled(captions: list[str]) -> list[str]:
    """Every image paired with another image's caption."""
    return captions[1:] + captions[:1]


@pytest.fixture(scope="module")
def transformers_clip_score(tiny_transformers_clip) -> ClipScore:
    return ClipScore(str(tiny_transformers_clip["model"]), backend="transformers")


@pytest.fixture(scope="module")
def pickscore(tiny_transformers_clip) -> PickScore:
    return PickScore(str(tiny_transformers_clip["model"]), str(tiny_transformers_clip["processor"]))


def test_clip_score_transformers_ranks_matching_captions_higher(transformers_clip_score, colour_pairs):
    images, captions = colour_pairs
    matching = transformers_clip_score.score(images, captions)
    mismatched = transformers_clip_score.score(images, rolled(captions))
    assert (matching > mismatched).all()


def test_clip_score_open_clip_ranks_matching_captions_higher(tiny_open_clip_dir, colour_pairs):
    metric = ClipScore(str(tiny_open_clip_dir), backend="open_clip")
    images, captions = colour_pairs
    assert (metric.score(images, captions) > metric.score(images, rolled(captions))).all()


def test_clip_score_is_100_times_the_clamped_cosine_as_torchmetrics_defines_it(
    transformers_clip_score, colour_pairs
):
    from torchmetrics.multimodal.clip_score import CLIPScore

    class TensorFeatures(torch.nn.Module):
        """The CLIP model with tensor-valued get_*_features, as torchmetrics expects (transformers 4)."""

        def __init__(self, model):
            super().__init__()
            self.model, self.config = model, model.config

        def get_image_features(self, *args, **kwargs):
            return self.model.get_image_features(*args, **kwargs).pooler_output

        def get_text_features(self, *args, **kwargs):
            return self.model.get_text_features(*args, **kwargs).pooler_output

    reference = CLIPScore(
        model_name_or_path=lambda: (
            TensorFeatures(transformers_clip_score.model),
            transformers_clip_score.processor,
        )
    )
    images, captions = colour_pairs
    pixels = [torch.from_numpy(__import__("numpy").asarray(image)).permute(2, 0, 1) for image in images]
    reference.update(pixels, captions)
    transformers_clip_score.reset()
    transformers_clip_score.update(images, captions)
    assert transformers_clip_score.compute() == pytest.approx(float(reference.compute()), abs=1e-3)


def test_clip_score_mean_accumulates_over_batches(transformers_clip_score, colour_pairs):
    images, captions = colour_pairs
    transformers_clip_score.reset()
    transformers_clip_score.update(images[:2], captions[:2])
    transformers_clip_score.update(images[2:], captions[2:])
    assert transformers_clip_score.compute() == pytest.approx(
        float(transformers_clip_score.score(images, captions).mean())
    )


def test_pickscore_ranks_matching_captions_higher(pickscore, colour_pairs):
    images, captions = colour_pairs
    assert (pickscore.score(images, captions) > pickscore.score(images, rolled(captions))).all()


def test_pickscore_is_logit_scale_times_cosine(pickscore, colour_pairs):
    images, captions = colour_pairs
    clip = ClipScore.__new__(ClipScore)  # same embeddings through the CLIP-score path
    clip.backend, clip.model, clip.processor, clip.device = (
        "transformers",
        pickscore.model,
        pickscore.processor,
        pickscore.device,
    )
    image, text = clip.embeddings(images, captions)
    expected = pickscore.model.logit_scale.exp() * (image * text).sum(-1)
    assert torch.allclose(pickscore.score(images, captions), expected, atol=1e-5)


def test_pickscore_preference_favours_the_matching_images(pickscore, colour_pairs):
    images, captions = colour_pairs
    ours = pickscore.score(images, captions)
    theirs = pickscore.score(images[1:] + images[:1], captions)  # another "model": wrong colours
    assert preference(ours, theirs) > 0.5 > preference(theirs, ours)
    assert preference(ours, theirs) + preference(theirs, ours) == pytest.approx(1.0)


def test_preference_needs_scores_for_the_same_captions():
    with pytest.raises(ValueError, match="equal-length"):
        preference(torch.ones(3), torch.ones(4))


def test_images_and_captions_must_pair_up(pickscore, colour_pairs):
    images, captions = colour_pairs
    with pytest.raises(ValueError, match="in pairs"):
        pickscore.score(images, captions[:-1])


def test_a_missing_model_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_clip"):
        ClipScore(str(tmp_path / "no_such_clip"))


def test_an_open_clip_folder_without_config_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="open_clip_config.json"):
        ClipScore(str(tmp_path), backend="open_clip")


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="open_clip"):
        ClipScore("x", backend="jax")


def test_an_unavailable_hub_model_says_how_to_use_a_local_copy(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match=r"hf download no-such-org/pickscore --local-dir DIR"):
        PickScore("no-such-org/pickscore", "no-such-org/processor")
