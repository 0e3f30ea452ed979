"""Resume: where each reader is in its stream, saved in the training checkpoint.

A reader is one (rank, DataLoader worker) pair. Its stream is a deterministic function of
(seed, epoch, rank, worker): in finite mode one epoch over its share of the shards; in resampled
mode an endless run of *blocks*, block b drawing its shards with an RNG seeded by
(seed, rank, worker, b). Samples leaving the shuffle buffer are numbered 0, 1, 2, ... and a
reader's position is

    {"epoch", "block", "block_start", "next", "pending"}

"next": how many samples it has numbered; "pending": numbers it has handed on but not yet delivered
in a batch (aspect buckets wait to fill); "block"/"block_start": the block holding the oldest
undelivered sample and that block's first number. Restoring regenerates the stream from that block and
drops, *before decoding*, every numbered sample below "next" that is not pending: the resumed run
delivers exactly what the interrupted one had not, in the same order. The cost is re-reading (not
decoding) at most one block (resampled) or the epoch so far (finite).

Each batch carries its reader's position (``batch["data_position"]``); a consumer marks a batch as
trained with :meth:`StreamPosition.advance`, which is what the checkpoint then holds.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch.distributed

STATE_VERSION = 1


class ReaderProgress:
    """One reader's numbering of samples (in its own process), and its position snapshot."""

    def __init__(self, epoch: int, resume: Mapping[str, Any] | None = None):
        self.epoch = epoch
        self.resume = dict(resume) if resume else None
        self.start_block = self.resume["block"] if self.resume else 0
        self.next_index = self.resume["block_start"] if self.resume else 0
        self._skip_below = self.resume["next"] if self.resume else 0
        self._keep = set(self.resume["pending"]) if self.resume else set()
        self.pending: set[int] = set()
        self.block_starts: dict[int, int] = {}

    def begin_block(self, block: int) -> None:
        self.block_starts[block] = self.next_index

    def number(self) -> tuple[int, bool]:
        """Number the next sample; returns (its number, whether it was delivered before the resume)."""
        index = self.next_index
        self.next_index += 1
        delivered = index < self._skip_below and index not in self._keep
        if not delivered:
            self.pending.add(index)
        return index, delivered

    def done(self, index: int) -> None:
        """The sample left the stream: delivered in a batch, or dropped (undecodable)."""
        self.pending.discard(index)

    def snapshot(self) -> dict[str, Any]:
        oldest = min(self.pending) if self.pending else self.next_index
        block = max((b for b, start in self.block_starts.items() if start <= oldest), default=self.start_block)
        for stale in [b for b in self.block_starts if b < block]:
            del self.block_starts[stale]
        return {"epoch": self.epoch, "block": block, "block_start": self.block_starts.get(block, 0),
                "next": self.next_index, "pending": sorted(self.pending)}


class StreamPosition:
    """The training stream's position for all readers; ``state_dict``/``load_state_dict`` for checkpoints.

    In DDP each rank only sees its own readers' batches; :meth:`state_dict` gathers every rank's
    readers (a collective: call it on all ranks, as Lightning does when it saves a checkpoint).
    """

    def __init__(self) -> None:
        self.epoch = 0
        self.readers: dict[str, dict[str, Any]] = {}
        self.layout: dict[str, Any] = {}

    @staticmethod
    def reader_key(rank: int, worker: int) -> str:
        return f"{rank}/{worker}"

    def bind(self, layout: Mapping[str, Any]) -> None:
        """Record the stream layout (mode, seed, shard digest, world size, workers) a run iterates with.

        A saved position only means something for the same layout; a mismatch is an error rather
        than a silent restart from an unrelated place.
        """
        layout = dict(layout)
        if self.readers and self.layout and self.layout != layout:
            changed = {k: (self.layout.get(k), layout.get(k)) for k in layout if self.layout.get(k) != layout.get(k)}
            raise ValueError(
                f"data resume: the checkpoint's data position was saved for a different stream layout "
                f"(saved vs now: {changed}); resume with the same shards, seed, mode, world size and "
                "data.num_workers, or set data.restore_stream=false to start the stream afresh"
            )
        self.layout = layout

    def resume_point(self, rank: int, worker: int) -> dict[str, Any] | None:
        """The saved position of reader (rank, worker) in the current epoch, if any."""
        entry = self.readers.get(self.reader_key(rank, worker))
        return copy.deepcopy(entry) if entry is not None and entry["epoch"] == self.epoch else None

    def advance(self, batch: Mapping[str, Any]) -> None:
        """Mark ``batch`` as consumed (trained on)."""
        position = batch.get("data_position")
        if position is None:
            raise ValueError("data resume: this batch has no 'data_position'; advance() takes batches from a "
                             "StreamLoader over an ImageShardStream or CachedShardStream")
        if position["epoch"] < self.epoch:
            return  # a batch of an epoch already marked finished
        key = self.reader_key(position["rank"], position["worker"])
        self.readers[key] = {k: position[k] for k in ("epoch", "block", "block_start", "next", "pending")}

    def finish_epoch(self, epoch: int) -> None:
        """A finite pass ended: the next iteration starts epoch + 1 from the beginning."""
        if epoch == self.epoch:
            self.epoch += 1
            self.readers = {}

    def state_dict(self, gather: bool = True) -> dict[str, Any]:
        readers = dict(self.readers)
        if gather and torch.distributed.is_available() and torch.distributed.is_initialized():
            everyone: list[dict] = [None] * torch.distributed.get_world_size()  # type: ignore[list-item]
            torch.distributed.all_gather_object(everyone, readers)
            readers = {k: v for part in everyone for k, v in part.items()}
        return {"version": STATE_VERSION, "epoch": self.epoch, "readers": copy.deepcopy(readers),
                "layout": dict(self.layout)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data resume: unknown data-position format version {state.get('version')!r} "
                             f"(this code reads {STATE_VERSION}); set data.restore_stream=false to start afresh")
        self.epoch = int(state["epoch"])
        self.readers = copy.deepcopy(dict(state["readers"]))
        self.layout = dict(state["layout"])
