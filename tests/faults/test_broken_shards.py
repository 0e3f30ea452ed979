"""Rotten shards: truncated and zero-byte tars, images of odd modes and sizes, captions that are not
UTF-8, json of the wrong types. Each broken input is skipped and counted by kind (or, for image
modes, converted to the right RGB); a real Stage C run on such shards completes."""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import wurst.data.synthetic
from wurst.data.data_stats import SKIP_KINDS, DataStats
from wurst.data.datamodule import WurstDataModule
from wurst.data.laion_filter import LAIONFilter
from wurst.data.shard_stream import UNREADABLE_DRAWS_LIMIT, ImageShardStream
from wurst.data.stream_loader import StreamLoader
from wurst.data.synthetic import MANIFEST, write_synthetic_shards
from wurst.train.export import read_provenance

from .conftest import stage_c_argv, stage_c_dir, write_hand_off_exports

GOOD_META = {"original_width": 1024, "original_height": 768, "pwatermark": 0.1, "punsafe": 0.1, "aesthetic": 6.0}
RED = (220, 40, 40)


def encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def sample(key: str, image: bytes | None = None, ext: str = "jpg", caption: bytes = b"a red square on a white background",
           meta: bytes | None = None) -> list[tuple[str, bytes]]:
    image = encoded(Image.new("RGB", (160, 120), RED), "JPEG") if image is None else image
    meta = json.dumps(GOOD_META).encode() if meta is None else meta
    return [(f"{key}.{ext}", image), (f"{key}.txt", caption), (f"{key}.json", meta)]


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path


def meta_with(**fields) -> bytes:
    return json.dumps({**GOOD_META, **fields}).encode()


# key -> what the reader must do with it: a skip kind, a filter rule, or "accepted".
DESIGNED = {
    "gray": "accepted", "cmyk": "accepted", "rgba": "accepted", "gray16": "accepted", "strnum": "accepted",
    "tiny": "bad_image_size", "sliver": "bad_image_size", "zero": "undecodable_image",
    "badutf8": "bad_caption", "jsonlist": "bad_json", "jsonbytes": "bad_json",
    "listnum": "filtered_size", "nullaes": "filtered_aesthetic", "infaes": "filtered_aesthetic",
}

# One pass over the rotten shards: skips by kind (the DESIGNED ones, the cut sample's shard, two
# shards that do not open).
SKIPS_PER_PASS = {"bad_image_size": 2, "undecodable_image": 1, "bad_caption": 1, "bad_json": 2, "truncated_tar": 1,
                  "shard_open_error": 2}


@pytest.fixture
def rotten_shards(tmp_path) -> Path:
    """broken.tar (one sample per DESIGNED key), truncated.tar (3 samples, the third cut), a zero-byte
    tar and a tar of random bytes."""
    folder = tmp_path / "rotten"
    folder.mkdir()
    red = Image.new("RGB", (160, 120), RED)
    gray16 = Image.fromarray(np.full((120, 160), 30000, dtype=np.uint16))
    members = [
        *sample("gray", encoded(red.convert("L"), "JPEG")),
        *sample("cmyk", encoded(red.convert("CMYK"), "JPEG")),
        *sample("rgba", encoded(Image.new("RGBA", (160, 120), (0, 0, 0, 0)), "PNG"), ext="png"),
        *sample("gray16", encoded(gray16, "PNG"), ext="png"),
        *sample("strnum", meta=json.dumps({k: str(v) for k, v in GOOD_META.items()}).encode()),
        *sample("tiny", encoded(Image.new("RGB", (1, 1), RED), "PNG"), ext="png"),
        *sample("sliver", encoded(Image.new("RGB", (1000, 10), RED), "PNG"), ext="png"),
        *sample("zero", b""),
        *sample("badutf8", caption=b"a red \xff\xfe square \xc3"),
        *sample("jsonlist", meta=b"[1024, 768]"),
        *sample("jsonbytes", meta=b"\xff{\"aesthetic\": 6"),
        *sample("listnum", meta=meta_with(original_width=[1024])),
        *sample("nullaes", meta=meta_with(aesthetic=None)),
        *sample("infaes", meta=b'{"original_width": 1024, "original_height": 768, "pwatermark": 0.1, '
                               b'"punsafe": 0.1, "aesthetic": Infinity}'),
    ]
    write_tar(folder / "broken.tar", members)
    truncated = write_tar(folder / "truncated.tar", [*sample("cut0"), *sample("cut1"), *sample("cut2")])
    with tarfile.open(truncated) as tar:
        cut = tar.getmember("cut2.jpg")
    os.truncate(truncated, cut.offset_data + cut.size // 2)  # a download that stopped inside cut2's image
    (folder / "empty.tar").write_bytes(b"")
    (folder / "garbage.tar").write_bytes(np.random.default_rng(0).bytes(10_000))
    return folder


def read_all(folder: Path) -> tuple[dict[str, torch.Tensor], DataStats]:
    stream = ImageShardStream(str(folder), 4, mode="finite", shuffle=False, resolution=128, compressor_resolution=96,
                              random_crop=False, laion_filter=LAIONFilter())
    stats = DataStats()
    images = {}
    for batch in StreamLoader(stream, stats=stats):
        images.update(zip(batch["keys"], batch["images"]))
    return images, stats


def test_every_rotten_input_is_skipped_and_counted_by_kind(rotten_shards):
    images, stats = read_all(rotten_shards)
    designed = Counter(DESIGNED.values())
    accepted = {key for key, fate in DESIGNED.items() if fate == "accepted"} | {"cut0", "cut1"}
    assert set(images) == accepted
    assert stats.skipped() == SKIPS_PER_PASS
    assert stats.filtered() == {"size": designed["filtered_size"], "aesthetic": designed["filtered_aesthetic"]}
    assert stats.counts["samples_accepted"] == len(accepted)


def test_odd_image_modes_are_converted_to_the_right_rgb(rotten_shards):
    images, _ = read_all(rotten_shards)
    centre = {key: (images[key][:, 64, 64] * 255).round().int().tolist() for key in ("gray", "cmyk", "rgba", "gray16")}
    gray = round(0.299 * RED[0] + 0.587 * RED[1] + 0.114 * RED[2])
    assert all(abs(v - gray) <= 3 for v in centre["gray"]) and len(set(centre["gray"])) == 1
    assert all(abs(v - c) <= 8 for v, c in zip(centre["cmyk"], RED))
    assert centre["rgba"] == [255, 255, 255]  # transparent: composited on white
    assert centre["gray16"] == [30000 >> 8] * 3  # 16-bit grey scaled to 8 bits, not clipped to white
    assert all(tuple(image.shape) == (3, 128, 128) and 0 <= image.min() <= image.max() <= 1 for image in images.values())


def test_json_numbers_that_are_not_finite_fail_their_rule():
    laion = LAIONFilter()
    assert laion.rejection({**GOOD_META, "aesthetic": float("inf")}) == "aesthetic"
    assert laion.rejection({**GOOD_META, "pwatermark": float("-inf")}) == "watermark"
    assert laion.rejection({k: str(v) for k, v in GOOD_META.items()}) is None  # strings of numbers are numbers


def test_blocks_of_broken_shards_do_not_stop_a_resampled_stream(rotten_shards, tmp_path):
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    write_synthetic_shards(mixed, num_samples=8, num_shards=1, resolution=32, fail_fractions={})
    for name in ("empty.tar", "garbage.tar"):
        os.link(rotten_shards / name, mixed / name)
    stream = ImageShardStream(str(mixed), 2, mode="resampled", resample_block_shards=1, shuffle=False, resolution=32,
                              laion_filter=LAIONFilter())
    stats = DataStats()
    loader = iter(StreamLoader(stream, stats=stats))
    for _ in range(40):  # 10 draws of the good shard, and about 20 of the broken ones between them
        next(loader)
    assert stats.counts["shard_open_error"] > 0


def test_a_stream_of_only_unreadable_shards_stops_with_a_clear_error(rotten_shards, tmp_path):
    dead = tmp_path / "dead"
    dead.mkdir()
    for name in ("empty.tar", "garbage.tar"):
        os.link(rotten_shards / name, dead / name)
    stream = ImageShardStream(str(dead), 2, mode="resampled", resample_block_shards=4, resolution=32)
    with pytest.raises(ValueError, match=f"{UNREADABLE_DRAWS_LIMIT} resampled shards in a row gave no readable sample"):
        next(iter(StreamLoader(stream)))


def test_a_synthetic_shard_write_cut_short_leaves_no_partial_dataset(tmp_path, monkeypatch):
    folder = tmp_path / "synthetic"
    module = WurstDataModule(str(folder), batch_size=4, num_workers=0,
                             synthesize={"num_samples": 32, "num_shards": 4, "resolution": 32})
    drawn = []
    real = wurst.data.synthetic.synthetic_image

    def dies_in_the_third_shard(*args, **kwargs):
        drawn.append(1)
        if len(drawn) > 20:  # 8 per shard: two shards complete, the third half written
            raise KeyboardInterrupt("the run was killed while writing its synthetic shards")
        return real(*args, **kwargs)

    monkeypatch.setattr(wurst.data.synthetic, "synthetic_image", dies_in_the_third_shard)
    with pytest.raises(KeyboardInterrupt):
        module.prepare_data()
    assert not list(folder.glob("*.tar")), "a partial shard set is in place; the next run would train on it alone"

    monkeypatch.setattr(wurst.data.synthetic, "synthetic_image", real)
    module.prepare_data()
    assert sorted(p.name for p in folder.glob("*.tar")) == [f"{i:05d}.tar" for i in range(4)]
    assert (folder / MANIFEST).is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["synthetic"]  # no staging folder left behind


@pytest.mark.slow
def test_a_stage_c_run_on_rotten_shards_completes_and_counts_the_skips(rotten_shards, tmp_path, launcher):
    # Finite mode: every shard is read in each pass (resampled draws might miss the rotten ones).
    write_synthetic_shards(rotten_shards, num_samples=32, num_shards=2, resolution=128, fail_fractions={})
    out = write_hand_off_exports(tmp_path / "out")
    code, output = launcher.run(
        stage_c_argv(out, 12, 6, f"data.shards={rotten_shards}", "data.synthesize=null", "data.mode=finite"),
        tmp_path / "run.log",
    )
    assert code == 0, output[-3000:]
    counts = read_provenance(stage_c_dir(out) / "export")["dataset"]["counts"]
    print(f"\nStage C on rotten shards, 12 steps (one pass and a bit): {counts}")
    assert all(counts.get(kind, 0) >= n for kind, n in SKIPS_PER_PASS.items()), counts
    assert {kind for kind in counts if kind in SKIP_KINDS} == set(SKIPS_PER_PASS)
    assert counts["samples_accepted"] > 32 + 2 + 5  # more than one pass: good shards, cut0/1, converted modes
