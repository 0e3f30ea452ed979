"""The training process's end of a shard stream: DataLoader workers, and the stream position.

``StreamLoader`` is what a training loop iterates. Each ``iter()`` makes a fresh DataLoader over the
stream after telling the stream (pickled into the workers) this process's rank, the epoch and where
each reader should resume, then hands the batches on. A batch counts as consumed when the consumer
calls ``position.advance(batch)``; with ``auto_advance`` (plain loops) that happens as it is handed out,
while the Lightning data module does it just before the training step (Lightning fetches one batch
ahead).
"""

from __future__ import annotations

import copy
import os
import signal
import threading
from collections.abc import Iterator
from functools import partial
from typing import Any

from torch.utils.data import DataLoader

from wurst.data.data_stats import DataStats
from wurst.data.resume import StreamPosition
from wurst.data.shard_stream import ShardStream
from wurst.data.topology import rank_and_world_size


def stop_only_for_parent(_worker_id: int = 0, owner: int | None = None) -> None:
    """A DataLoader worker's SIGTERM policy (``worker_init_fn``): survive SLURM's, obey its owner's.

    SLURM sends SIGTERM to every process of a job (scontrol requeue, preemption, the time limit): a
    worker must outlive it so the training process can finish its step and write the checkpoint
    (slurm/preemption.py). But the training process stops its workers with SIGTERM too (the DataLoader's
    shutdown, multiprocessing's exit handler), and a worker that ignored that one kept the process
    waiting at exit forever after any error (a text file named ``x.tar``, a filter that rejects
    everything) and the SLURM job held its allocation until the time limit. So SIGTERM is blocked here
    and a thread takes it with its sender's pid: from the owner (the training process that made the
    DataLoader; the parent unless a forkserver started the worker), the worker exits at once; from anyone
    else, it is dropped. The thread also ends the worker within a second of the owner's death (SIGKILL,
    OOM killer), when no one is left to send anything.
    """
    parent = os.getppid()
    owner = parent if owner is None else owner
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads started later inherit the mask
    threading.Thread(target=_obey_owner, args=(owner, parent), name="wurst-worker-sigterm", daemon=True).start()


def _obey_owner(owner: int, parent: int) -> None:
    while True:
        info = signal.sigtimedwait({signal.SIGTERM}, _PARENT_CHECK_S)
        if info is not None and info.si_pid == owner:
            os._exit(0)  # asked to stop by the training process: a clean exit, not a "killed" worker
        if os.getppid() != parent or not _alive(owner):
            os._exit(1)  # the training process is gone


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_PARENT_CHECK_S = 1.0


class StreamLoader:
    """Iterable of batch dicts over ``stream`` with ``num_workers`` DataLoader workers.

    position: the resumable position (shared with a checkpoint); a new one when None.
    auto_advance: mark each batch consumed as it is yielded (False when something else, e.g. the
        Lightning data module, calls ``position.advance`` once the batch is really trained on).
    stats: if given, every batch's ``data_stats`` is added to it as the batch is yielded.
    placement: (rank, world_size) to read as; default: this process's (topology.rank_and_world_size).
    """

    def __init__(self, stream: ShardStream, num_workers: int = 0, position: StreamPosition | None = None,
                 auto_advance: bool = True, stats: DataStats | None = None, pin_memory: bool = False,
                 prefetch_factor: int | None = 2, multiprocessing_context: str | None = None,
                 placement: tuple[int, int] | None = None):
        if num_workers < 0:
            raise ValueError(f"data.num_workers={num_workers} must be >= 0")
        self.stream = stream
        self.num_workers = num_workers
        self.position = position if position is not None else StreamPosition()
        self.auto_advance = auto_advance
        self.stats = stats
        self.pin_memory = pin_memory
        self.prefetch_factor = prefetch_factor if num_workers > 0 else None
        self.multiprocessing_context = multiprocessing_context if num_workers > 0 else None
        self.placement = placement

    def __iter__(self) -> Iterator[dict[str, Any]]:
        rank, world_size = self.placement or rank_and_world_size()
        self.position.bind(self.stream.layout(world_size, self.num_workers))
        epoch = self.position.epoch
        stream = copy.copy(self.stream)
        stream.rank, stream.world_size, stream.epoch = rank, world_size, epoch
        stream.resume = {
            f"{rank}/{worker}": point
            for worker in range(max(1, self.num_workers))
            if (point := self.position.resume_point(rank, worker)) is not None
        }
        loader = DataLoader(stream, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
                            prefetch_factor=self.prefetch_factor,
                            multiprocessing_context=self.multiprocessing_context,
                            worker_init_fn=partial(stop_only_for_parent, owner=os.getpid())
                            if self.num_workers > 0 else None)
        batches = iter(loader)
        try:
            yield from self._hand_out(batches)
        except Exception:
            # A worker's error (or the stream's) ends the run: stop the other workers now rather than
            # after the DataLoader's 5 s join per worker (one may be busy in an endless resampled stream).
            for worker in getattr(batches, "_workers", ()):
                if worker.is_alive():
                    worker.terminate()  # this process's SIGTERM, which a worker obeys
            raise
        if self.stream.mode == "finite":
            self.position.finish_epoch(epoch)

    def _hand_out(self, batches: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for batch in batches:
            if self.stats is not None:
                self.stats.update(batch["data_stats"])
            if self.auto_advance:
                self.position.advance(batch)
            yield batch
