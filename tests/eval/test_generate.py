"""Generation: per-prompt seeds, rank sharding independent of world size, atomic writes, resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from wurst.data.topology import rank_and_world_size
from wurst.eval.generate import generate_images, shard
from wurst.eval.prompt_set import records_from_captions

CAPTIONS = [
    "a red circle on a blue background",
    "a yellow square on a green background",
    "a white triangle on a black background",
    "a blue star on a yellow background",
    "a green circle on a white background",
]
SIDE = 128  # the tiny cascade's image size (Stage C 16×3×3, Stage B 4×32×32)


class CountingSampler:
    """Wraps a sampler and records the captions it was asked for."""

    def __init__(self, sampler, fail_after_calls: int | None = None):
        self.sampler, self.fail_after_calls, self.captions, self.calls = sampler, fail_after_calls, [], 0

    def __call__(self, captions, height, width, generator=None):
        if self.fail_after_calls is not None and self.calls >= self.fail_after_calls:
            raise KeyboardInterrupt("simulated interruption")
        self.calls += 1
        self.captions += list(captions)
        return self.sampler(captions, height, width, generator=generator)


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


@pytest.fixture
def records():
    return records_from_captions(CAPTIONS)


def run(sampler, records, out, **kwargs):
    kwargs = {"height": SIDE, "width": SIDE, "batch_size": 2, "base_seed": 7, "progress": False, **kwargs}
    return generate_images(sampler, records, out, **kwargs)


def test_shards_partition_the_prompts(records):
    shards = [shard(records, rank, 3) for rank in range(3)]
    assert sorted(r.index for s in shards for r in s) == list(range(len(records)))
    assert [r.index for r in shards[1]] == [1, 4]


def test_writes_one_png_per_prompt_from_the_real_cascade(tiny_cascade, records, tmp_path):
    summary = run(tiny_cascade, records, tmp_path)
    assert sorted(summary.written) == [r.id for r in records] and summary.skipped == []
    with Image.open(tmp_path / f"{records[0].id}.png") as image:
        assert (image.format, image.size) == ("PNG", (SIDE, SIDE))


def test_images_do_not_depend_on_world_size_or_batch(tiny_cascade, records, tmp_path):
    run(tiny_cascade, records, tmp_path / "one", rank=0, world_size=1, batch_size=3)
    for rank in range(2):
        run(tiny_cascade, records, tmp_path / "two", rank=rank, world_size=2, batch_size=1)
    for record in records:
        one, two = (
            pixels(tmp_path / "one" / f"{record.id}.png"),
            pixels(tmp_path / "two" / f"{record.id}.png"),
        )
        # float noise from other batch shapes may flip an 8-bit rounding, nothing more
        assert np.abs(one - two).max() <= 1


def test_the_seed_is_base_seed_plus_prompt_index(tiny_cascade, records, tmp_path):
    run(tiny_cascade, records[2:3], tmp_path / "alone", base_seed=7)
    expected = tiny_cascade([CAPTIONS[2]], SIDE, SIDE, generator=[torch.Generator().manual_seed(7 + 2)])
    other_seed = tiny_cascade([CAPTIONS[2]], SIDE, SIDE, generator=[torch.Generator().manual_seed(7 + 3)])
    written = pixels(tmp_path / "alone" / f"{records[2].id}.png")
    assert np.abs(written - (expected[0].permute(1, 2, 0).numpy() * 255).round()).max() <= 1
    assert np.abs(written - (other_seed[0].permute(1, 2, 0).numpy() * 255).round()).max() > 10


def test_rank_only_writes_its_shard(tiny_cascade, records, tmp_path):
    summary = run(tiny_cascade, records, tmp_path, rank=1, world_size=2)
    assert (
        sorted(p.stem for p in tmp_path.glob("*.png"))
        == sorted(summary.written)
        == [records[1].id, records[3].id]
    )


def test_interrupted_generation_resumes_without_redoing_written_images(tiny_cascade, records, tmp_path):
    interrupted = CountingSampler(tiny_cascade, fail_after_calls=1)
    with pytest.raises(KeyboardInterrupt):
        run(interrupted, records, tmp_path, batch_size=2)
    done = {p.stem: p.stat().st_mtime_ns for p in tmp_path.glob("*.png")}
    assert sorted(done) == [records[0].id, records[1].id]
    (tmp_path / f".{records[2].id}.png.partial-123").write_bytes(b"half a png")  # a killed write
    resumed = CountingSampler(tiny_cascade)
    summary = run(resumed, records, tmp_path, batch_size=2)
    assert resumed.captions == CAPTIONS[2:]
    assert sorted(summary.skipped) == sorted(done)
    assert {p.stem: p.stat().st_mtime_ns for p in tmp_path.glob("*.png") if p.stem in done} == done
    assert len(list(tmp_path.glob("*.png"))) == len(records)


def test_rank_and_world_size_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert rank_and_world_size() == (2, 4)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ValueError, match=r"RANK=4 is not a valid rank for WORLD_SIZE=4"):
        rank_and_world_size()


def test_a_sampler_returning_the_wrong_shape_is_named(records, tmp_path):
    def bad_sampler(captions, height, width, generator=None):
        return torch.zeros(len(captions), 3, height // 2, width)

    with pytest.raises(ValueError, match=r"returned \(2, 3, 64, 128\) for 2 prompts"):
        run(bad_sampler, records, tmp_path)
