"""The Lightning data module a ``conf/data/*.yaml`` instantiates.

It builds the shard stream for a stage, derives the per-device batch from the global one, writes
the synthetic shards on first use (``prepare_data``), and keeps the stream position and data stats
in the training checkpoint (Lightning saves a data module's ``state_dict`` and restores it before
the dataloaders are iterated), so a resumed run continues its data stream instead of restarting it.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningDataModule

from wurst.data.data_stats import DataStats
from wurst.data.image_folder import ImageFolderSource
from wurst.data.laion_filter import LAIONFilter
from wurst.data.resume import StreamPosition
from wurst.data.shard_stream import CachedShardStream, ImageShardStream, ShardStream
from wurst.data.stream_loader import StreamLoader
from wurst.data.synthetic import MANIFEST, write_synthetic_shards
from wurst.data.topology import rank_and_world_size
from wurst.data.transforms import AspectBuckets

log = logging.getLogger(__name__)


def per_device_batch_size(global_batch_size: int, world_size: int, accumulate_grad_batches: int = 1) -> int:
    """global batch / (devices x accumulation); an indivisible combination is an error, not a rounding."""
    if global_batch_size is None or global_batch_size < 1:
        raise ValueError(f"data.global_batch_size={global_batch_size!r} must be a positive sample count; "
                         "set it in the experiment (REFERENCE.md gives 512 for Stage B phase 1, for example)")
    devices = world_size * accumulate_grad_batches
    if global_batch_size % devices:
        raise ValueError(
            f"data.global_batch_size={global_batch_size} is not divisible by world size {world_size} x "
            f"accumulate_grad_batches {accumulate_grad_batches} = {devices}; change one of them so it divides"
        )
    return global_batch_size // devices


def _move_into_place(staging: Path, folder: Path) -> None:
    """Rename the finished ``staging`` folder to ``folder`` (absent or empty) in one step."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(staging, folder)
        return
    except OSError:
        if any(folder.glob("*.tar")):  # another node's prepare_data finished first: use its shards
            return
    # ``folder`` holds other files (a note, leftovers): move the shards in, the manifest last.
    for path in sorted(staging.iterdir(), key=lambda p: p.name == MANIFEST):
        os.replace(path, folder / path.name)


class WurstDataModule(LightningDataModule):
    """Training (and optional validation) batches for one stage; see shard_stream.py for the batch dict.

    shards / val_shards: shard specs (shard_spec.py); val is read finite, in order, centre-cropped.
    global_batch_size: samples per optimiser step over all devices; or ``batch_size`` per device.
    cached: read ``wurst-data cache`` shards (latents, text states) instead of images.
    filter: a LAIONFilter (or its fields as a mapping); None keeps every well-formed sample.
    buckets: ``{"aspect_ratios": [...]}`` for one-aspect-per-batch bucketing (Stage C phase 3).
    synthesize: ``write_synthetic_shards`` arguments; when ``shards`` is a local folder without tars,
        ``prepare_data`` writes synthetic shards there (the embedded tiny pipeline's data).
    restore_stream: restore the stream position from a checkpoint (False starts it afresh).
    image_folder: ``{path, cache_dir, per_shard}``: read a folder of ``.jpg`` + ``.txt`` pairs instead of
        ``shards`` (packed once into shards under ``cache_dir`` by ``prepare_data``; data/image_folder.py).
    The rest are ShardStream / ImageShardStream / StreamLoader arguments of the same names.
    """

    def __init__(self, shards: str | Sequence[str], global_batch_size: int | None = None,
                 batch_size: int | None = None, num_workers: int = 2, mode: str = "resampled",
                 shuffle: bool = True, shuffle_buffer: int = 1000, seed: int = 0, resample_block_shards: int = 4,
                 resolution: int = 128, compressor_resolution: int | None = None, random_crop: bool = True,
                 filter: LAIONFilter | Mapping[str, Any] | None = None,  # the config's word, shadowing the builtin here only
                 buckets: AspectBuckets | Mapping[str, Any] | None = None, reject_all_check: int = 1000,
                 cached: bool = False, val_shards: str | Sequence[str] | None = None,
                 val_batch_size: int | None = None, synthesize: Mapping[str, Any] | None = None,
                 pin_memory: bool = False, prefetch_factor: int = 2, restore_stream: bool = True,
                 image_folder: Mapping[str, Any] | None = None):
        super().__init__()
        self.image_folder = ImageFolderSource(**image_folder) if image_folder else None
        self.shards = str(self.image_folder.shard_dir) if self.image_folder else shards
        self.global_batch_size = global_batch_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.stream_args = {"mode": mode, "shuffle": shuffle, "shuffle_buffer": shuffle_buffer, "seed": seed,
                            "resample_block_shards": resample_block_shards}
        if isinstance(filter, Mapping):
            filter = LAIONFilter(**{k: v for k, v in filter.items() if k != "_target_"})
        if isinstance(buckets, Mapping):
            buckets = AspectBuckets(resolution, compressor_resolution, list(buckets["aspect_ratios"]))
        self.image_args = {"resolution": resolution, "compressor_resolution": compressor_resolution,
                           "laion_filter": filter, "buckets": buckets, "reject_all_check": reject_all_check}
        self.random_crop = random_crop
        self.cached = cached
        self.val_shards = val_shards
        self.val_batch_size = val_batch_size
        self.synthesize = dict(synthesize) if synthesize else None
        self.loader_args = {"pin_memory": pin_memory, "prefetch_factor": prefetch_factor}
        self.restore_stream = restore_stream
        self.position = StreamPosition()
        self.stats = DataStats()
        self.train_stream: ShardStream | None = None
        self.val_stream: ShardStream | None = None
        if val_shards is not None:  # only then does Lightning see a val_dataloader (no empty-loader warnings)
            self.val_dataloader = self._val_dataloader

    def prepare_data(self) -> None:
        """Write the synthetic shards once (Lightning calls this on one process per node)."""
        if self.image_folder is not None:
            self.image_folder.pack()
            return
        if not self.synthesize:
            return
        if not isinstance(self.shards, str) or "://" in self.shards or "{" in self.shards:
            raise ValueError(f"data.synthesize needs data.shards to be a local folder, not {self.shards!r}")
        folder = Path(self.shards)
        if not any(folder.glob("*.tar")):
            log.info("data: writing synthetic shards to %s", folder)
            laion_filter = self.image_args["laion_filter"]
            # Written beside the folder and moved in whole: a run killed half-way must not leave a
            # partial shard set that the next run (seeing *.tar) would take for the whole dataset.
            staging = folder.with_name(f".{folder.name}.tmp-{socket.gethostname()}-{os.getpid()}")
            shutil.rmtree(staging, ignore_errors=True)
            try:
                write_synthetic_shards(staging, laion_filter=laion_filter, **self.synthesize)
                _move_into_place(staging, folder)
            finally:
                shutil.rmtree(staging, ignore_errors=True)

    def _batch_size(self) -> int:
        if self.batch_size is not None:
            return self.batch_size
        if self.trainer is not None:
            world_size, accumulate = self.trainer.world_size, self.trainer.accumulate_grad_batches
        else:
            world_size, accumulate = rank_and_world_size()[1], 1
        return per_device_batch_size(self.global_batch_size, world_size, accumulate)

    def _stream(self, shards: str | Sequence[str], batch_size: int, training: bool) -> ShardStream:
        stream_args = dict(self.stream_args)
        if not training:
            stream_args.update(mode="finite", shuffle=False)
        if self.cached:
            return CachedShardStream(shards, batch_size, **stream_args)
        return ImageShardStream(shards, batch_size, random_crop=self.random_crop and training,
                                **self.image_args, **stream_args)

    def setup(self, stage: str | None = None) -> None:
        if self.train_stream is None:
            if self.trainer is None:  # standalone use; a Trainer calls prepare_data itself
                self.prepare_data()
            batch_size = self._batch_size()
            self.train_stream = self._stream(self.shards, batch_size, training=True)
            if self.val_shards is not None:
                self.val_stream = self._stream(self.val_shards, self.val_batch_size or batch_size, training=False)

    def train_dataloader(self) -> StreamLoader:
        self.setup()
        # Under a Trainer a batch counts as consumed just before its training step
        # (on_before_batch_transfer), not when Lightning prefetches it.
        return StreamLoader(self.train_stream, self.num_workers, position=self.position,
                            auto_advance=self.trainer is None, stats=None if self.trainer else self.stats,
                            **self.loader_args)

    def _val_dataloader(self) -> StreamLoader:
        self.setup()
        # Never advanced: every validation pass starts at the beginning.
        return StreamLoader(self.val_stream, self.num_workers, auto_advance=False, **self.loader_args)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if self.trainer is not None and self.trainer.training and isinstance(batch, dict) and "data_position" in batch:
            self.position.advance(batch)
            self.stats.update(batch["data_stats"])
            # Counted here, once: the running totals are ``self.stats`` (logged as data/* by
            # train.callbacks.DataCounts); the batch's own counts cover only the worker's last batch.
            batch = {key: value for key, value in batch.items() if key != "data_stats"}
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position.state_dict(), "stats": self.stats.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not self.restore_stream:
            log.info("data: restore_stream=false, the data stream starts afresh")
            return
        self.position.load_state_dict(state_dict["position"])
        self.stats.load_state_dict(state_dict["stats"])
