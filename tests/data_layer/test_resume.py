"""Resume: a checkpointed stream position restored in a new process continues the stream."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from wurst.data.laion_filter import LAIONFilter
from wurst.data.resume import StreamPosition
from wurst.data.shard_stream import ImageShardStream
from wurst.data.stream_loader import StreamLoader

from .conftest import READER_SCRIPT
from .reader_process import read


def read_in_new_process(tmp_path, shards, mode, state, batches=None):
    """Restore ``state`` in a fresh Python process (nothing shared with this one) and read on."""
    state_file, out = tmp_path / "state.json", tmp_path / "rest.json"
    state_file.write_text(json.dumps(state))
    command = [sys.executable, str(READER_SCRIPT), str(shards), str(out), "--mode", mode, "--workers", "2",
               "--load", str(state_file)] + (["--batches", str(batches)] if batches is not None else [])
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=120)
    return json.loads(out.read_text())


def keys(run):
    return [k for _, ks in run["batches"] for k in ks]


def per_worker(batches):
    streams: dict[int, list[str]] = {0: [], 1: []}
    for worker, keys in batches:
        streams[worker].extend(keys)
    return streams


@pytest.mark.slow
def test_finite_mode_resumed_in_a_new_process_reads_exactly_the_rest(clean_shards, tmp_path):
    folder, _ = clean_shards
    whole = read(str(folder), "finite")
    first = read(str(folder), "finite", batches=5)
    rest = read_in_new_process(tmp_path, folder, "finite", json.loads(json.dumps(first["state"])))
    assert sorted(keys(first) + keys(rest)) == sorted(keys(whole))
    assert len(keys(first)) == 20 and len(keys(rest)) == len(keys(whole)) - 20
    # and each reader continues its own order, not just the same set
    for worker in (0, 1):
        assert per_worker(first["batches"])[worker] + per_worker(rest["batches"])[worker] == \
            per_worker(whole["batches"])[worker]


@pytest.mark.slow
def test_resampled_mode_resumed_in_a_new_process_continues_the_same_stream(clean_shards, tmp_path):
    folder, _ = clean_shards
    whole = read(str(folder), "resampled", batches=24)
    first = read(str(folder), "resampled", batches=10)
    rest = read_in_new_process(tmp_path, folder, "resampled", first["state"], batches=14)
    for worker in (0, 1):
        assert per_worker(first["batches"])[worker] + per_worker(rest["batches"])[worker] == \
            per_worker(whole["batches"])[worker]


def aspect_stream(folder, **args):
    from wurst.data.transforms import AspectBuckets

    return ImageShardStream(str(folder), 3, mode="finite", shuffle=True, shuffle_buffer=16, seed=2, resolution=128,
                            buckets=AspectBuckets(128, None, [1.0, 2.0, 0.5]), laion_filter=LAIONFilter(), **args)


def test_resume_keeps_samples_waiting_in_aspect_buckets(tmp_path):
    """Samples pulled into a half-full bucket but never delivered come back after a resume."""
    from wurst.data.synthetic import write_synthetic_shards

    write_synthetic_shards(tmp_path, num_samples=48, num_shards=2, resolution=16, aspect_ratios=(1.0, 2.0, 0.5))
    whole = [b["keys"] for b in StreamLoader(aspect_stream(tmp_path))]
    loader = StreamLoader(aspect_stream(tmp_path))
    first = [b["keys"] for _, b in zip(range(5), loader)]
    assert loader.position.readers["0/0"]["pending"]  # half-full buckets were holding samples
    position = StreamPosition()
    position.load_state_dict(json.loads(json.dumps(loader.position.state_dict())))
    rest = [b["keys"] for b in StreamLoader(aspect_stream(tmp_path), position=position)]
    assert first + rest == whole


def test_a_position_saved_for_another_layout_is_refused(clean_shards):
    folder, _ = clean_shards
    stream = ImageShardStream(str(folder), 4, mode="finite", resolution=8, laion_filter=LAIONFilter())
    loader = StreamLoader(stream, num_workers=0)
    next(iter(loader))
    position = StreamPosition()
    position.load_state_dict(loader.position.state_dict())
    with pytest.raises(ValueError, match="different stream layout.*num_workers"):
        next(iter(StreamLoader(stream, num_workers=2, position=position)))


def test_after_a_full_finite_pass_the_next_iteration_is_the_next_epoch(clean_shards):
    folder, _ = clean_shards
    stream = ImageShardStream(str(folder), 8, mode="finite", shuffle=True, shuffle_buffer=8, resolution=8,
                              laion_filter=LAIONFilter())
    loader = StreamLoader(stream)
    epoch0 = [k for b in loader for k in b["keys"]]
    epoch1 = [k for b in loader for k in b["keys"]]
    assert loader.position.epoch == 2
    assert sorted(epoch0) == sorted(epoch1) and epoch0 != epoch1  # same samples, reshuffled
