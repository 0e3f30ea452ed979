"""FID and Inception Score: torchmetrics over torch-fidelity's Inception, weights from a local path."""

from __future__ import annotations

import pytest
import torch

from wurst.eval.inception import build_fid, build_inception_score, resolve_inception_weights

# Feature 64 (the first pool of the real network) keeps CPU time small; the 2048 path is the same
# class and code with more layers.
FEATURE = 64


@pytest.fixture(scope="module")
def image_set() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return (torch.rand(8, 3, 32, 32, generator=generator) * 255).to(torch.uint8)


def perturbed(images: torch.Tensor, strength: float) -> torch.Tensor:
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(2)) * 255 * strength
    return (images.float() + noise).clamp(0, 255).to(torch.uint8)


@pytest.fixture(scope="module")
def fid_against(inception_weights, image_set):
    """FID of a generated set against ``image_set`` (real features computed once)."""
    fid = build_fid(inception_weights, feature=FEATURE)
    fid.reset_real_features = False  # keep the real statistics across reset()
    fid.update(image_set, real=True)

    def compute(fake: torch.Tensor) -> float:
        fid.reset()
        fid.update(fake, real=False)
        return float(fid.compute())

    return compute


def test_fid_of_a_set_against_itself_is_zero(fid_against, image_set):
    assert abs(fid_against(image_set)) < 1e-4


def test_fid_grows_as_the_generated_set_is_perturbed(fid_against, image_set):
    values = [fid_against(perturbed(image_set, s)) for s in (0.02, 0.1, 0.3)]
    assert 1e-4 < values[0] < values[1] < values[2]


def test_fid_loads_the_weights_it_is_given(inception_weights):
    state = torch.load(inception_weights)
    loaded = build_fid(inception_weights, feature=FEATURE).inception.state_dict()
    assert state.keys() == loaded.keys()
    assert all(torch.equal(state[k], loaded[k]) for k in state)


def test_a_folder_holding_the_weights_file_is_accepted(inception_weights):
    assert resolve_inception_weights(inception_weights.parent) == str(inception_weights)


def test_missing_weights_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        build_fid(tmp_path / "nowhere.pth")


def test_a_folder_without_weights_is_rejected(tmp_path):
    with pytest.raises(FileNotFoundError, match="weights-inception-2015-12-05"):
        resolve_inception_weights(tmp_path)


def test_unknown_fid_feature_is_rejected():
    with pytest.raises(ValueError, match="2048 is the standard"):
        build_fid(None, feature=100)


def test_inception_score_of_identical_images_is_one(inception_weights, image_set):
    score = build_inception_score(inception_weights, feature="logits_unbiased", splits=1)
    score.update(image_set[:1].repeat(2, 1, 1, 1))
    assert float(score.compute()[0]) == pytest.approx(1.0, abs=1e-5)


def test_inception_score_is_higher_for_diverse_images(inception_weights, image_set):
    def inception_score(images):
        metric = build_inception_score(inception_weights, feature=FEATURE, splits=1)
        metric.update(images)
        return float(metric.compute()[0])

    assert inception_score(image_set) > inception_score(image_set[:1].repeat(8, 1, 1, 1)) + 1e-4
