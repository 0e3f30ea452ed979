"""The WebDataset stream: tar shards in, training batches out.

Read top to bottom, one reader's (rank, DataLoader worker) pipeline is this list of stages,
in the spirit of open_clip's training data code:

    shards -> split by node -> split by worker        (finite mode; resampled mode draws per reader)
    -> tar to samples       broken tars/shards are counted and skipped, never raised
    -> check and filter     missing members, bad json, LAION metadata rules: before any decoding
    -> shuffle buffer       seeded by (seed, epoch or block, rank, worker)
    -> number and skip      resume: drop what the interrupted run already delivered, still undecoded
    -> decode and transform draft-mode JPEG decode, crops at the stage and compressor resolutions
    -> batch                (optionally one aspect bucket per batch), with stats and position attached

Batches are dicts::

    images            float [B, 3, H, W] in [0, 1], the stage resolution
    compressor_images float [B, 3, h, w] in [0, 1], the compressor resolution (when configured)
    captions, keys    list[str]
    shard             the shard the first sample came from
    data_stats        dict[str, int]: counts by kind since this reader's previous batch (see data_stats.py)
    data_position     this reader's position after the batch (see resume.py)

Cached shards (``wurst-data cache``) yield ``compressor_latents`` [B, 16, h, w] and ``text_hidden``
[B, 77, D] (float32, stored as fp16) instead of images.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import random
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset
from webdataset.filters import _shuffle as shuffle_buffer

from wurst.data import data_stats as kinds
from wurst.data.captions import clean_caption
from wurst.data.data_stats import DataStats
from wurst.data.laion_filter import LAIONFilter
from wurst.data.resume import ReaderProgress
from wurst.data.shard_spec import expand_shards, open_shard, shard_list_digest
from wurst.data.topology import rank_and_world_size, stream_seed, worker_and_num_workers
from wurst.data.transforms import IMAGE_EXTENSIONS, AspectBuckets, ImageSizeError, StageTransform

log = logging.getLogger(__name__)

MODES = ("resampled", "finite")
# Resampled mode gives up when this many shards drawn in a row gave no sample: every shard is then
# almost surely unreadable (a wrong spec, not tars). One block of broken shards is no such proof: with
# a fraction f of broken shards, a block of k draws is all broken with probability f**k, and a
# week-long run draws many blocks; 64 in a row is f**64 (1e-19 for f = 1/2).
UNREADABLE_DRAWS_LIMIT = 64
CACHED_MEMBERS = ("compressor_latents.npy", "text_hidden.npy")


@dataclass(frozen=True)
class ShardEnd:
    """Marker after the last sample of a shard (only with ``shard_ends=True``, for the latent cache)."""

    url: str


@dataclass
class Reader:
    """One reader's identity and running state, created in its own process at the start of iteration."""

    rank: int
    world_size: int
    worker: int
    num_workers: int
    epoch: int
    stats: DataStats = field(default_factory=DataStats)
    progress: ReaderProgress | None = None
    filter_checked: int = 0  # well-formed samples the LAION filter has judged
    filter_kept: int = 0

    def seed(self, base: int, *parts: object) -> int:
        return stream_seed(base, *parts, self.rank, self.worker)


# --- stages -----------------------------------------------------------------------------------------


def split_by_node(urls: Sequence[str], reader: Reader) -> list[str]:
    """Every world_size-th shard from this rank's offset: ranks read disjoint shards."""
    return list(urls)[reader.rank :: reader.world_size]


def split_by_worker(urls: Sequence[str], reader: Reader) -> list[str]:
    """Every num_workers-th of this rank's shards from this worker's offset."""
    return list(urls)[reader.worker :: reader.num_workers]


def _split_key(name: str) -> tuple[str | None, str | None]:
    """``dir/000123.compressor_latents.npy`` -> (``dir/000123``, ``compressor_latents.npy``), as webdataset."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    if dot <= slash:
        return None, None
    return name[:dot], name[dot + 1 :].lower()


def tar_to_samples(urls: Iterable[str], reader: Reader, shard_ends: bool = False) -> Iterator[Any]:
    """Group tar members into samples ``{"__key__", "__url__", ext: bytes}``.

    A shard that cannot be opened counts as ``shard_open_error``; one that breaks mid-way (truncated
    download, corrupt block) as ``truncated_tar``, dropping the sample being read; the stream goes on
    with the next shard either way.
    """
    stats = reader.stats
    for url in urls:
        try:
            stream = open_shard(url)
        except Exception as error:  # noqa: BLE001 (any filesystem, network or pipe failure: skip the shard)
            stats.skip(kinds.SHARD_OPEN_ERROR, url, error)
            continue
        members_read = 0
        try:
            with tarfile.open(fileobj=stream, mode="r|*") as tar:
                current: dict[str, Any] | None = None
                for member in tar:
                    if not member.isreg():
                        continue
                    key, ext = _split_key(member.name)
                    if key is None:
                        continue
                    if current is not None and (key != current["__key__"] or ext in current):
                        stats.count(kinds.READ)
                        yield current  # complete: the next member belongs to another sample
                        current = None
                    payload = tar.extractfile(member).read()
                    members_read += 1
                    if current is None:
                        current = {"__key__": key, "__url__": url}
                    current[ext] = payload
                if current is not None:
                    stats.count(kinds.READ)
                    yield current
        except (tarfile.TarError, EOFError, OSError, ValueError) as error:
            kind = kinds.TRUNCATED_TAR if members_read else kinds.SHARD_OPEN_ERROR
            stats.skip(kind, url, error)
        finally:
            try:
                stream.close()
            except OSError:
                pass  # a pipe: whose command we stopped early exits non-zero; nothing was lost
        if shard_ends:
            yield ShardEnd(url)


def _is_utf8(payload: bytes) -> bool:
    try:
        payload.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def judge_sample(sample: dict[str, Any], laion_filter: LAIONFilter | None) -> tuple[str | None, str, str, dict | None]:
    """(skip or ``filtered_<rule>`` kind, or None to keep; why; cleaned caption; parsed json or None)."""
    if not any(ext in sample for ext in IMAGE_EXTENSIONS):
        return kinds.MISSING_IMAGE, f"members {sorted(k for k in sample if k[0] != '_')}", "", None
    if "txt" in sample and not _is_utf8(sample["txt"]):
        return kinds.BAD_CAPTION, "caption bytes are not valid UTF-8 (img2dataset writes UTF-8: corrupt)", "", None
    caption = clean_caption(sample["txt"]) if "txt" in sample else ""
    if not caption:
        return kinds.MISSING_CAPTION, "no txt member" if "txt" not in sample else "empty caption", "", None
    if laion_filter is None:
        return None, "", caption, None
    if "json" not in sample:
        return kinds.MISSING_JSON, "no json member; the LAION filter needs its metadata", caption, None
    try:
        meta = json.loads(sample["json"])
    except ValueError as error:  # also UnicodeDecodeError
        return kinds.BAD_JSON, str(error), caption, None
    if not isinstance(meta, dict):
        return kinds.BAD_JSON, f"json is a {type(meta).__name__}, not an object", caption, None
    rule = laion_filter.rejection(meta, caption)
    return (None if rule is None else kinds.FILTERED_PREFIX + rule), "", caption, meta


def check_and_filter(samples: Iterable[Any], reader: Reader, laion_filter: LAIONFilter | None,
                     reject_all_check: int) -> Iterator[Any]:
    """Keep well-formed samples that pass the LAION filter; decide on the json, never on pixels.

    Output: ``{"key", "url", "image": bytes, "caption": str}``. If the filter has rejected every one of
    the first ``reject_all_check`` well-formed samples, raise: the thresholds or the metadata are wrong.
    """
    stats = reader.stats
    for sample in samples:
        if isinstance(sample, ShardEnd):
            yield sample
            continue
        kind, why, caption, _meta = judge_sample(sample, laion_filter)
        if kind is not None and not kind.startswith(kinds.FILTERED_PREFIX):
            stats.skip(kind, f"{sample['__url__']}:{sample['__key__']}", why)
            continue
        if laion_filter is not None:
            reader.filter_checked += 1
            if kind is not None:
                stats.count(kind)
                if reader.filter_checked == reject_all_check and reader.filter_kept == 0:
                    raise ValueError(
                        f"data filter: the LAION filter rejected all of the first {reject_all_check} samples "
                        f"(by rule: {stats.filtered()}); thresholds: {laion_filter.describe()}. Check "
                        "data.filter against your shards' json (img2dataset must keep the metadata columns "
                        "original_width, original_height, pwatermark, punsafe, aesthetic)"
                    )
                continue
            reader.filter_kept += 1
        image_ext = next(ext for ext in IMAGE_EXTENSIONS if ext in sample)
        yield {"key": sample["__key__"], "url": sample["__url__"], "image": sample[image_ext], "caption": caption}


def check_cached(samples: Iterable[Any], reader: Reader) -> Iterator[Any]:
    """Keep cached samples that have both arrays and a caption."""
    for sample in samples:
        if isinstance(sample, ShardEnd):
            yield sample
            continue
        where = f"{sample['__url__']}:{sample['__key__']}"
        absent = [m for m in CACHED_MEMBERS if m not in sample]
        if absent:
            reader.stats.skip(kinds.MISSING_ARRAY, where, f"no {', '.join(absent)}")
            continue
        caption = clean_caption(sample.get("txt", b""))
        yield {"key": sample["__key__"], "url": sample["__url__"], "caption": caption,
               "arrays": {m.removesuffix(".npy"): sample[m] for m in CACHED_MEMBERS}}


def number_and_skip(samples: Iterable[Any], reader: Reader) -> Iterator[Any]:
    """Number samples in stream order; on resume drop those already delivered (before decoding)."""
    progress = reader.progress
    for sample in samples:
        if isinstance(sample, ShardEnd):
            yield sample
            continue
        index, delivered = progress.number()
        if not delivered:
            sample["index"] = index
            yield sample


def decode_and_transform(samples: Iterable[Any], reader: Reader, transform: StageTransform,
                         seed: int) -> Iterator[Any]:
    """Decode each image and crop it for the stage and the compressor; undecodable images are skipped.

    Crop offsets come from an RNG seeded by the sample's place in its reader's stream (seed, epoch,
    number, key, rank, worker), so a resumed stream crops as the uninterrupted one would, and a
    sample drawn again later (resampled mode) gets a new crop.
    """
    for sample in samples:
        if isinstance(sample, ShardEnd):
            yield sample
            continue
        rng = random.Random(reader.seed(seed, "crop", reader.epoch, sample["index"], sample["key"]))
        try:
            image, compressor_image, bucket = transform(sample.pop("image"), rng)
        except Exception as error:  # noqa: BLE001 (PIL raises OSError, ValueError, SyntaxError... for broken images)
            kind = kinds.BAD_IMAGE_SIZE if isinstance(error, ImageSizeError) else kinds.UNDECODABLE_IMAGE
            reader.stats.skip(kind, f"{sample['url']}:{sample['key']}", error)
            reader.progress.done(sample["index"])
            continue
        sample.update(images=image, compressor_images=compressor_image, bucket=bucket)
        yield sample


def decode_arrays(samples: Iterable[Any], reader: Reader) -> Iterator[Any]:
    """``.npy`` bytes -> float32 tensors; an unreadable array skips the sample."""
    for sample in samples:
        if isinstance(sample, ShardEnd):
            yield sample
            continue
        try:
            for name, payload in sample.pop("arrays").items():
                sample[name] = torch.from_numpy(np.load(io.BytesIO(payload), allow_pickle=False).astype(np.float32))
        except (ValueError, OSError, EOFError) as error:
            reader.stats.skip(kinds.BAD_ARRAY, f"{sample['url']}:{sample['key']}", error)
            reader.progress.done(sample["index"])
            continue
        sample["bucket"] = 0
        yield sample


def _collate(samples: list[dict[str, Any]], tensor_names: Sequence[str]) -> dict[str, Any]:
    batch: dict[str, Any] = {"captions": [s["caption"] for s in samples], "keys": [s["key"] for s in samples]}
    for name in tensor_names:
        if samples[0].get(name) is None:
            continue
        stacked = torch.stack([s[name] for s in samples])
        batch[name] = stacked.float().div_(255) if stacked.dtype == torch.uint8 else stacked
    return batch


def batch_samples(samples: Iterable[Any], reader: Reader, batch_size: int, tensor_names: Sequence[str],
                  partial: bool) -> Iterator[dict[str, Any]]:
    """Batches of ``batch_size`` samples of one bucket.

    A full batch is sent when the next sample arrives or the stream ends, stamped with the counts and
    position of that moment, so skips after the last full batch of a finite stream are still reported.
    With ``ShardEnd`` markers, open batches are flushed at each shard's end and the marker is passed
    on as ``{"shard_end": url}``, so no batch mixes shards.
    """
    open_batches: dict[int, list[dict[str, Any]]] = {}
    ready: list[dict[str, Any]] = []

    def close(members: list[dict[str, Any]]) -> None:
        for member in members:
            reader.progress.done(member["index"])
            reader.stats.count(kinds.ACCEPTED)
        batch = _collate(members, tensor_names)
        batch["shard"] = members[0]["url"]
        ready.append(batch)

    for sample in samples:
        while ready:
            yield _stamp(ready.pop(0), reader)
        if isinstance(sample, ShardEnd):
            for members in open_batches.values():
                close(members)
            open_batches.clear()
            while ready:
                yield _stamp(ready.pop(0), reader)
            yield _stamp({"shard_end": sample.url}, reader)
            continue
        members = open_batches.setdefault(sample["bucket"], [])
        members.append(sample)
        if len(members) == batch_size:
            close(open_batches.pop(sample["bucket"]))
    if partial:
        for members in open_batches.values():
            close(members)
    for batch in ready:
        yield _stamp(batch, reader)


def _stamp(batch: dict[str, Any], reader: Reader) -> dict[str, Any]:
    batch["data_stats"] = reader.stats.take_batch_delta()
    batch["data_position"] = {"rank": reader.rank, "worker": reader.worker, **reader.progress.snapshot()}
    return batch


# --- the streams --------------------------------------------------------------------------------------


class ShardStream(IterableDataset):
    """A stream of batches over tar shards; the common part of image and cached streams.

    shards: a shard spec (see shard_spec.py).
    batch_size: samples per batch (per device).
    mode: "resampled" (endless, shards drawn with replacement per reader; training) or "finite" (one
        pass, every shard once across all readers; evaluation and caching).
    shuffle: shuffle shard order (finite) and samples (both modes) through a buffer of ``shuffle_buffer``.
    seed: the stream seed; with (epoch or block, rank, worker) it fixes every random choice.
    resample_block_shards: resampled mode draws shards in blocks of this many per reader; a resume
        re-reads (without decoding) at most one block.
    shard_ends: emit ``{"shard_end": url}`` after each shard (finite, unshuffled; the latent cache).
    """

    tensor_names: tuple[str, ...] = ()

    def __init__(self, shards: str | Sequence[str], batch_size: int, mode: str = "resampled",
                 shuffle: bool = True, shuffle_buffer: int = 1000, seed: int = 0,
                 resample_block_shards: int = 4, shard_ends: bool = False):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"data.mode={mode!r} is not one of {MODES}; use resampled for training, "
                             "finite for evaluation and caching")
        if batch_size < 1:
            raise ValueError(f"data batch_size={batch_size} must be >= 1")
        if shard_ends and (mode != "finite" or shuffle):
            raise ValueError("shard_ends=True needs mode='finite' and shuffle=False (shard-by-shard order)")
        if resample_block_shards < 1:
            raise ValueError(f"data.resample_block_shards={resample_block_shards} must be >= 1")
        self.urls = expand_shards(shards)
        self.batch_size = batch_size
        self.mode = mode
        self.shuffle = shuffle
        self.shuffle_buffer = max(1, shuffle_buffer) if shuffle else 1
        self.seed = seed
        self.resample_block_shards = resample_block_shards
        self.shard_ends = shard_ends
        # Set by StreamLoader in the training process before workers start (they cannot see
        # torch.distributed themselves); left None, the reader looks itself up.
        self.rank: int | None = None
        self.world_size: int | None = None
        self.epoch = 0
        self.resume: dict[str, dict[str, Any]] = {}

    def layout(self, world_size: int, num_workers: int) -> dict[str, Any]:
        """What a saved position depends on (see StreamPosition.bind)."""
        return {"mode": self.mode, "seed": self.seed, "shuffle": self.shuffle, "shards": shard_list_digest(self.urls),
                "world_size": world_size, "num_workers": max(1, num_workers),
                "block_shards": self.resample_block_shards if self.mode == "resampled" else None}

    # The per-reader sample source, before decoding; subclasses add their checks.
    def _checked(self, samples: Iterator[Any], reader: Reader) -> Iterator[Any]:
        raise NotImplementedError

    def _decoded(self, samples: Iterator[Any], reader: Reader) -> Iterator[Any]:
        raise NotImplementedError

    def _block(self, urls: Sequence[str], reader: Reader, shuffle_seed: int) -> Iterator[Any]:
        """Samples of one block (a finite epoch's share, or one resampled block), shuffled within it."""
        samples = self._checked(tar_to_samples(urls, reader, self.shard_ends), reader)
        if self.shuffle:
            samples = shuffle_buffer(samples, bufsize=self.shuffle_buffer, initial=self.shuffle_buffer,
                                     rng=random.Random(shuffle_seed))
        return samples

    def _finite_samples(self, reader: Reader) -> Iterator[Any]:
        urls = list(self.urls)
        if self.shuffle:  # same order on every rank (seeded by seed and epoch only), then split
            random.Random(stream_seed(self.seed, "shards", reader.epoch)).shuffle(urls)
        urls = split_by_worker(split_by_node(urls, reader), reader)
        reader.progress.begin_block(0)
        yield from self._block(urls, reader, reader.seed(self.seed, "samples", reader.epoch))

    def _resampled_samples(self, reader: Reader) -> Iterator[Any]:
        unreadable = 0  # shards drawn in a row that gave no sample
        for block in itertools.count(reader.progress.start_block):
            rng = random.Random(reader.seed(self.seed, "shards", block))
            urls = [rng.choice(self.urls) for _ in range(self.resample_block_shards)]
            reader.progress.begin_block(block)
            read_before = reader.stats.counts[kinds.READ]
            yield from self._block(urls, reader, reader.seed(self.seed, "samples", block))
            unreadable = unreadable + len(urls) if reader.stats.counts[kinds.READ] == read_before else 0
            if unreadable >= UNREADABLE_DRAWS_LIMIT:
                raise ValueError(
                    f"data shards: {unreadable} resampled shards in a row gave no readable sample "
                    f"(skips so far: {reader.stats.skipped()}); check data.shards and that the shards are tars"
                )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker, num_workers = worker_and_num_workers()
        rank, world_size = (self.rank, self.world_size) if self.rank is not None else rank_and_world_size()
        if self.mode == "finite" and len(self.urls) < world_size:
            raise ValueError(f"data shards: finite mode splits shards across ranks, but there are "
                             f"{len(self.urls)} shards for {world_size} ranks; give at least one shard per rank")
        if self.mode == "finite" and num_workers > 1 and len(self.urls) < world_size * num_workers:
            log.warning("data: %d shards for %d ranks x %d workers; some workers will be idle",
                        len(self.urls), world_size, num_workers)
        reader = Reader(rank, world_size, worker, num_workers, self.epoch)
        reader.progress = ReaderProgress(self.epoch, self.resume.get(f"{rank}/{worker}"))
        # shards -> split by node and worker (finite) or drawn (resampled) -> tar -> check, filter -> shuffle
        samples = self._finite_samples(reader) if self.mode == "finite" else self._resampled_samples(reader)
        samples = number_and_skip(samples, reader)  # resume: drop what was delivered, still undecoded
        samples = self._decoded(samples, reader)  # decode and crop (images) or load arrays (cache)
        return batch_samples(samples, reader, self.batch_size, self.tensor_names, partial=self.mode == "finite")


class ImageShardStream(ShardStream):
    """LAION-format image shards -> image batches (see module docstring).

    resolution / compressor_resolution: square crop sides for the stage and the compressor (or None).
    random_crop: random (training) or centred (evaluation, caching) crops.
    laion_filter: the metadata filter, or None to keep every well-formed sample.
    buckets: aspect buckets (Stage C phase 3); batches then hold one bucket each.
    reject_all_check: raise if the filter rejects all of the first this-many samples of a reader.
    """

    tensor_names = ("images", "compressor_images")

    def __init__(self, shards: str | Sequence[str], batch_size: int, resolution: int = 128,
                 compressor_resolution: int | None = None, random_crop: bool = True,
                 laion_filter: LAIONFilter | None = None, buckets: AspectBuckets | None = None,
                 reject_all_check: int = 1000, **stream_args: Any):
        super().__init__(shards, batch_size, **stream_args)
        self.transform = StageTransform(resolution, compressor_resolution, random_crop, buckets)
        self.laion_filter = laion_filter
        self.reject_all_check = reject_all_check

    def _checked(self, samples: Iterator[Any], reader: Reader) -> Iterator[Any]:
        return check_and_filter(samples, reader, self.laion_filter, self.reject_all_check)

    def _decoded(self, samples: Iterator[Any], reader: Reader) -> Iterator[Any]:
        return decode_and_transform(samples, reader, self.transform, self.seed)


class CachedShardStream(ShardStream):
    """Shards written by ``wurst-data cache`` -> ``compressor_latents`` / ``text_hidden`` batches."""

    tensor_names = ("compressor_latents", "text_hidden")

    def _checked(self, samples: Iterator[Any], reader: Reader) -> Iterator[Any]:
        return check_cached(samples, reader)

    def _decoded(self, samples: Iterator[Any], reader: Reader) -> Iterator[Any]:
        return decode_arrays(samples, reader)
