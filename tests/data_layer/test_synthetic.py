"""Synthetic shards: img2dataset layout, LAION fields, designed failures, determinism."""

from __future__ import annotations

import io
import json
import re
import tarfile

from PIL import Image

from wurst.data.synthetic import COLORS, SHAPES, write_synthetic_shards


def members(path):
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar}


def test_shards_have_the_img2dataset_layout_with_laion_fields(clean_shards):
    folder, manifest = clean_shards
    files = members(folder / manifest["shards"][0])
    keys = sorted({name.split(".")[0] for name in files})
    assert len(keys) == 20 and all(re.fullmatch(r"\d{9}", k) for k in keys)
    meta = json.loads(files[f"{keys[0]}.json"])
    for field in ("url", "key", "caption", "original_width", "original_height", "pwatermark", "punsafe", "width"):
        assert field in meta
    assert Image.open(io.BytesIO(files[f"{keys[0]}.jpg"])).size == (32, 32)


def test_captions_name_the_colours_and_shape_drawn(clean_shards):
    folder, manifest = clean_shards
    files = members(folder / manifest["shards"][1])
    pattern = re.compile(rf"an? ({'|'.join(COLORS)}) ({'|'.join(SHAPES)}) on a ({'|'.join(COLORS)}) background")
    captions = [v.decode() for k, v in files.items() if k.endswith(".txt")]
    assert captions and all(pattern.fullmatch(c) for c in captions)


def test_both_spellings_of_the_aesthetic_score_occur(clean_shards):
    folder, manifest = clean_shards
    metas = [json.loads(v) for k, v in members(folder / manifest["shards"][0]).items() if k.endswith(".json")]
    assert any("aesthetic" in m for m in metas) and any("AESTHETIC_SCORE" in m for m in metas)


def test_the_manifest_designs_the_requested_failure_counts(clean_shards):
    _, manifest = clean_shards
    fates = list(manifest["fates"].values())
    # default fractions of 160 samples: size 10%, watermark 5%, unsafe 5%, aesthetic 10%
    assert [fates.count(r) for r in ("size", "watermark", "unsafe", "aesthetic")] == [16, 8, 8, 16]
    assert manifest["expected"]["samples_accepted"] == 112


def test_the_same_seed_writes_the_same_bytes(tmp_path):
    write_synthetic_shards(tmp_path / "a", num_samples=12, num_shards=2, resolution=16, seed=1)
    write_synthetic_shards(tmp_path / "b", num_samples=12, num_shards=2, resolution=16, seed=1)
    write_synthetic_shards(tmp_path / "c", num_samples=12, num_shards=2, resolution=16, seed=2)
    assert (tmp_path / "a/00001.tar").read_bytes() == (tmp_path / "b/00001.tar").read_bytes()
    assert (tmp_path / "a/00001.tar").read_bytes() != (tmp_path / "c/00001.tar").read_bytes()


def test_the_truncated_shard_loses_the_samples_after_the_cut(broken_shards):
    _, manifest = broken_shards
    lost = manifest["lost_to_truncation"]
    assert lost and all(k.startswith("00007") for k in lost)
    assert manifest["expected"]["truncated_tar"] == 1
