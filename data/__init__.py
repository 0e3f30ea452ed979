"""The data layer: LAION-aesthetic WebDataset streaming, synthetic shards and a latent cache.

Rooms:
  shard_spec.py      shard specs (brace patterns, folders, globs, pipe:, fsspec URLs) -> shard URLs
  topology.py        rank / world size / DataLoader worker of this reader, stream seeds
  laion_filter.py    the LAION metadata filter (REFERENCE.md "Data")
  captions.py        caption cleaning
  transforms.py      draft-mode decoding, stage/compressor crops, aspect buckets
  shard_stream.py    the pipeline stages and the streams (image shards, cached shards)
  data_stats.py      skip/filter counters shipped with every batch
  resume.py          the stream position saved in checkpoints
  stream_loader.py   DataLoader workers + position tracking, what a training loop iterates
  datamodule.py      the Lightning data module conf/data/*.yaml instantiates
  synthetic.py       synthetic LAION-format shards (tiny pipeline data, test fixture)
  latent_cache.py    frozen-encoder outputs for Stage C
  inspect_shards.py  shard statistics
  cli.py             ``wurst-data``

This package imports neither ``models`` nor ``train`` nor ``eval``.
"""

from wurst.data.data_stats import DataStats
from wurst.data.laion_filter import LAIONFilter
from wurst.data.resume import StreamPosition
from wurst.data.shard_spec import expand_shards
from wurst.data.shard_stream import CachedShardStream, ImageShardStream
from wurst.data.stream_loader import StreamLoader
from wurst.data.transforms import AspectBuckets

__all__ = ["AspectBuckets", "CachedShardStream", "DataStats", "ImageShardStream", "LAIONFilter", "StreamLoader",
           "StreamPosition", "expand_shards"]
