"""The LAION metadata filter of REFERENCE.md, its config, and its per-phase overrides."""

from __future__ import annotations

import math

import pytest
from omegaconf import OmegaConf

from wurst.data.laion_filter import LAIONFilter

from .conftest import CONF_DIR

KEPT = {"original_width": 1024, "original_height": 768, "pwatermark": 0.1, "punsafe": 0.2, "aesthetic": 5.5}


def with_(**changes):
    meta = dict(KEPT)
    for key, value in changes.items():
        if value is ...:
            meta.pop(key)
        else:
            meta[key] = value
    return meta


def test_a_sample_within_every_threshold_is_kept(laion_filter):
    assert laion_filter.rejection(KEPT, "a red circle") is None


@pytest.mark.parametrize("changes, rule", [
    ({"original_width": 511}, "size"), ({"original_height": 4097}, "size"), ({"original_width": ...}, "size"),
    ({"pwatermark": 0.51}, "watermark"), ({"pwatermark": None}, "watermark"),
    ({"punsafe": 0.995}, "unsafe"), ({"punsafe": ...}, "unsafe"),
    ({"aesthetic": 4.99}, "aesthetic"), ({"aesthetic": ...}, "aesthetic"), ({"aesthetic": math.nan}, "aesthetic"),
])
def test_each_rule_rejects_out_of_range_and_missing_fields(laion_filter, changes, rule):
    assert laion_filter.rejection(with_(**changes), "a caption") == rule


def test_the_boundaries_are_inclusive(laion_filter):
    meta = with_(original_width=512, original_height=4096, pwatermark=0.5, punsafe=0.99, aesthetic=5.0)
    assert laion_filter.rejection(meta, "x") is None


def test_the_aesthetic_score_is_read_under_either_key(laion_filter):
    assert laion_filter.rejection(with_(aesthetic=..., AESTHETIC_SCORE=6.0), "x") is None
    assert laion_filter.rejection(with_(aesthetic=..., AESTHETIC_SCORE=4.0), "x") == "aesthetic"


def test_optional_caption_rules():
    rules = LAIONFilter(min_caption_words=3, ascii_only=True, forbidden_substrings=["Stock Photo"])
    assert rules.rejection(KEPT, "a red circle") is None
    assert rules.rejection(KEPT, "red circle") == "caption_words"
    assert rules.rejection(KEPT, "a red círcle") == "caption_ascii"
    assert rules.rejection(KEPT, "a red circle stock photo") == "caption_forbidden"


def test_the_config_holds_the_reference_thresholds():
    config = OmegaConf.load(CONF_DIR / "data" / "filter" / "laion.yaml")
    assert (config.min_original_size, config.max_original_size) == (512, 4096)
    assert (config.max_pwatermark, config.max_punsafe, config.min_aesthetic) == (0.5, 0.99, 5.0)
    assert list(config.aesthetic_keys) == ["aesthetic", "AESTHETIC_SCORE"]


def test_a_phase_can_raise_the_aesthetic_threshold(laion_filter):
    strict = LAIONFilter(min_aesthetic=6.5)
    assert laion_filter.rejection(with_(aesthetic=6.0), "x") is None
    assert strict.rejection(with_(aesthetic=6.0), "x") == "aesthetic"


def test_contradictory_thresholds_are_a_clear_error():
    with pytest.raises(ValueError, match="min_original_size=600 exceeds max_original_size=500"):
        LAIONFilter(min_original_size=600, max_original_size=500)
