"""Shared fixtures: synthetic LAION-format shards written once per session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from wurst.data.laion_filter import LAIONFilter
from wurst.data.synthetic import write_synthetic_shards

READER_SCRIPT = Path(__file__).with_name("reader_process.py")
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


@pytest.fixture(scope="session")
def broken_shards(tmp_path_factory) -> tuple[Path, dict]:
    """8 shards, designed filter failures, one of every corrupt member, the last shard truncated."""
    out = tmp_path_factory.mktemp("broken_shards")
    corrupt = {"truncated_jpg": 2, "bad_json": 2, "missing_txt": 2, "missing_json": 2, "missing_jpg": 2}
    manifest = write_synthetic_shards(out, num_samples=192, num_shards=8, resolution=48, seed=3,
                                      corrupt=corrupt, truncate_last_shard=True)
    return out, manifest


@pytest.fixture(scope="session")
def clean_shards(tmp_path_factory) -> tuple[Path, dict]:
    """8 shards of 20 samples with designed filter failures and no corruption."""
    out = tmp_path_factory.mktemp("clean_shards")
    return out, write_synthetic_shards(out, num_samples=160, num_shards=8, resolution=32, seed=5)


@pytest.fixture
def laion_filter() -> LAIONFilter:
    return LAIONFilter()


@pytest.fixture
def python() -> str:
    return sys.executable
