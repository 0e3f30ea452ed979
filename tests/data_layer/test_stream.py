"""The image stream: designed filter counts, broken input skipped and counted, batch contents."""

from __future__ import annotations

import itertools

import pytest

from wurst.data.data_stats import DataStats
from wurst.data.laion_filter import LAIONFilter
from wurst.data.shard_stream import ImageShardStream
from wurst.data.stream_loader import StreamLoader


def read_finite(shards, num_workers=0, **overrides):
    args = {"batch_size": 8, "mode": "finite", "shuffle": False, "resolution": 24, "compressor_resolution": 16,
            "laion_filter": LAIONFilter()}
    args.update(overrides)
    stats = DataStats()
    batches = list(StreamLoader(ImageShardStream(shards, **args), num_workers=num_workers, stats=stats))
    return batches, stats


def test_filter_and_skip_counts_equal_what_the_generator_designed(broken_shards):
    folder, manifest = broken_shards
    _, stats = read_finite(str(folder), num_workers=2)
    expected = {kind: n for kind, n in manifest["expected"].items() if n}
    assert dict(stats.counts) == expected


def test_exactly_the_designed_passing_samples_are_delivered(broken_shards):
    folder, manifest = broken_shards
    batches, _ = read_finite(str(folder))
    keys = [k for b in batches for k in b["keys"]]
    designed = {k for k, fate in manifest["fates"].items() if fate == "pass" and k not in manifest["lost_to_truncation"]}
    assert len(keys) == len(set(keys)) and set(keys) == designed


def test_the_stream_reads_on_after_a_truncated_shard(broken_shards):
    folder, _ = broken_shards
    shards = [str(folder / "00007.tar"), str(folder / "00000.tar")]  # the truncated one first
    batches, stats = read_finite(shards)
    assert stats.counts["truncated_tar"] == 1
    assert any(k.startswith("00000") for b in batches for k in b["keys"])


def test_an_unreadable_shard_is_counted_and_skipped(clean_shards, tmp_path):
    folder, _ = clean_shards
    (tmp_path / "garbage.tar").write_bytes(b"this is not a tar archive" * 40)
    shards = [str(tmp_path / "garbage.tar"), f"pipe:cat {tmp_path}/missing.tar", str(folder / "00000.tar")]
    _, stats = read_finite(shards)
    assert stats.counts["shard_open_error"] == 2
    assert stats.counts["samples_accepted"] > 0


def test_batches_carry_their_skip_counts_across_worker_processes(broken_shards):
    folder, manifest = broken_shards
    batches, _ = read_finite(str(folder), num_workers=2)
    summed = DataStats()
    for batch in batches:
        summed.update(batch["data_stats"])
    assert summed.skipped()["bad_json"] == manifest["expected"]["bad_json"]
    assert summed.counts["samples_accepted"] == sum(len(b["keys"]) for b in batches)


def test_batches_hold_images_and_compressor_images_in_unit_range(clean_shards):
    folder, _ = clean_shards
    batch = read_finite(str(folder))[0][0]
    assert batch["images"].shape == (8, 3, 24, 24) and batch["compressor_images"].shape == (8, 3, 16, 16)
    assert batch["images"].dtype.is_floating_point
    assert 0.0 <= batch["images"].min() and batch["images"].max() <= 1.0
    assert len(batch["captions"]) == len(batch["keys"]) == 8 and all(batch["captions"])


def test_without_a_compressor_resolution_there_are_no_compressor_images(clean_shards):
    folder, _ = clean_shards
    batch = read_finite(str(folder), compressor_resolution=None)[0][0]
    assert "compressor_images" not in batch


def test_shuffling_is_deterministic_by_seed_and_changes_with_it(clean_shards):
    folder, _ = clean_shards

    def keys(seed):
        stream = ImageShardStream(str(folder), 8, mode="resampled", shuffle_buffer=32, seed=seed, resolution=8,
                                  laion_filter=LAIONFilter())
        return [k for b in itertools.islice(StreamLoader(stream), 6) for k in b["keys"]]

    assert keys(1) == keys(1)
    assert keys(1) != keys(2)


def test_a_filter_rejecting_everything_is_a_clear_error(clean_shards):
    folder, _ = clean_shards
    with pytest.raises(ValueError, match="rejected all of the first 50 samples"):
        read_finite(str(folder), laion_filter=LAIONFilter(min_aesthetic=99.0), reject_all_check=50)


def test_fewer_shards_than_ranks_is_an_error_in_finite_mode(clean_shards):
    folder, _ = clean_shards
    stream = ImageShardStream(str(folder / "00000.tar"), 4, mode="finite", resolution=8)
    with pytest.raises(ValueError, match="1 shards for 2 ranks"):
        list(StreamLoader(stream, placement=(0, 2)))


def test_bad_stream_settings_are_errors_naming_the_setting(clean_shards):
    folder, _ = clean_shards
    with pytest.raises(ValueError, match="data.mode='random'"):
        ImageShardStream(str(folder), 4, mode="random")
    with pytest.raises(ValueError, match="data.resolution=0"):
        ImageShardStream(str(folder), 4, resolution=0)


@pytest.mark.parametrize("batch_size", [1, 2, 3, 6])
def test_skips_after_the_last_full_batch_are_still_reported(tmp_path, batch_size):
    from wurst.data.synthetic import write_synthetic_shards

    # seed 2: the shard ends with two samples the filter rejects, after the last passing one
    manifest = write_synthetic_shards(tmp_path, num_samples=12, num_shards=1, resolution=16,
                                      fail_fractions={"aesthetic": 0.5}, seed=2)
    assert list(manifest["fates"].values())[-2:] == ["aesthetic", "aesthetic"]
    _, stats = read_finite(str(tmp_path), batch_size=batch_size)
    assert stats.counts["filtered_aesthetic"] == 6 and stats.counts["samples_accepted"] == 6
