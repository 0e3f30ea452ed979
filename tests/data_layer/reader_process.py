"""A reader for the distributed and resume tests, in this process or as a separate one.

    python reader_process.py SHARDS OUT.json --mode finite [--batches N] [--workers 2] [--load STATE.json]

With MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE in the environment it joins a gloo process group first,
as a DDP rank would. Writes {"batches": [[worker, keys], ...], "state": position state_dict}.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch.distributed as dist

from wurst.data.laion_filter import LAIONFilter
from wurst.data.resume import StreamPosition
from wurst.data.shard_stream import ImageShardStream
from wurst.data.stream_loader import StreamLoader


def read(shards: str, mode: str, batches: int | None = None, workers: int = 2, state: dict | None = None) -> dict:
    """Read ``batches`` batches (all, in finite mode) from a fixed test stream, optionally resuming."""
    stream = ImageShardStream(shards, batch_size=4, mode=mode, shuffle=True, shuffle_buffer=16, seed=7,
                              resample_block_shards=2, resolution=16, laion_filter=LAIONFilter())
    position = StreamPosition()
    if state is not None:
        position.load_state_dict(state)
    loader = StreamLoader(stream, num_workers=workers, position=position)
    read_batches = [[b["data_position"]["worker"], b["keys"]] for b in itertools.islice(loader, batches)]
    return {"batches": read_batches, "state": position.state_dict()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("shards")
    parser.add_argument("out")
    parser.add_argument("--mode", default="finite")
    parser.add_argument("--batches", type=int, default=None)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--load", default=None)
    args = parser.parse_args()
    if "MASTER_ADDR" in os.environ:
        dist.init_process_group("gloo", init_method="env://")
    state = json.loads(Path(args.load).read_text()) if args.load else None
    result = read(args.shards, args.mode, args.batches, args.workers, state)
    if dist.is_initialized():
        dist.destroy_process_group()
    Path(args.out).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
