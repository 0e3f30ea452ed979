"""Data pipeline throughput: our stream vs a plain WebDataset pipeline, samples/s of one worker.

Both read the same synthetic shards of 1024-px JPEGs (with grain, so they decode like photographs)
of which half fail the LAION filter, and produce the same batches: a 512-px stage crop and a 384-px
compressor crop (Stage B phase 1), in [0, 1].

  plain: decode every image at full size (webdataset's PIL decoder), then filter on the json, then
         resize and crop with torchvision;
  ours:  filter on the json before decoding, decode with PIL's JPEG draft mode (libjpeg scales while
         decoding), one bicubic resize of just the crop region.

Torch runs one thread, as in a DataLoader worker. Each pipeline runs ``--repeats`` times, alternating,
and the best time of each counts (the machine may be shared). Prints both figures and their ratio;
exits 1 if ours is not at least 2x faster.

    .venv/bin/python benchmarks/bench_data_pipeline.py [--samples 64] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import webdataset as wds
from torchvision.transforms import v2

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wurst.data.laion_filter import LAIONFilter
from wurst.data.shard_stream import ImageShardStream
from wurst.data.stream_loader import StreamLoader
from wurst.data.synthetic import write_synthetic_shards

HALF_FAILING = {"size": 0.125, "watermark": 0.125, "unsafe": 0.125, "aesthetic": 0.125}


def plain_pipeline(shards: list[str], laion_filter: LAIONFilter, resolution: int, compressor_resolution: int,
                   batch_size: int) -> wds.WebDataset:
    """Decode everything at full size, then filter, then torchvision resizes: the usual first attempt."""
    to_float = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])
    stage = v2.Compose([v2.Resize(resolution, antialias=True), v2.CenterCrop(resolution)])
    compressor = v2.Resize(compressor_resolution, antialias=True)

    def keep(sample: dict) -> bool:
        return laion_filter.rejection(sample["json"], sample["txt"]) is None

    def transform(sample: dict) -> dict:
        image = stage(to_float(sample["jpg"]))
        return {"images": image, "compressor_images": compressor(image), "captions": sample["txt"],
                "keys": sample["__key__"]}

    def collate(samples: list[dict]) -> dict:
        return {"images": torch.stack([s["images"] for s in samples]),
                "compressor_images": torch.stack([s["compressor_images"] for s in samples]),
                "captions": [s["captions"] for s in samples], "keys": [s["keys"] for s in samples]}

    return (wds.WebDataset(shards, shardshuffle=False, empty_check=False).decode("pilrgb").select(keep)
            .map(transform).batched(batch_size, collation_fn=collate))


def our_pipeline(shards: list[str], laion_filter: LAIONFilter, resolution: int, compressor_resolution: int,
                 batch_size: int) -> StreamLoader:
    stream = ImageShardStream(shards, batch_size, resolution=resolution, compressor_resolution=compressor_resolution,
                              random_crop=False, laion_filter=laion_filter, mode="finite", shuffle=False)
    return StreamLoader(stream, num_workers=0)


def timed(batches) -> tuple[float, int]:
    start = time.perf_counter()
    delivered = sum(len(batch["keys"]) for batch in batches)
    return time.perf_counter() - start, delivered


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=64, help="input samples (half fail the filter)")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--source-resolution", type=int, default=1024)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--compressor-resolution", type=int, default=384)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--noise", type=float, default=10.0, help="grain sigma (10: ~370 KB per 1024-px JPEG)")
    parser.add_argument("--out", default=None, help="where to write the shards (default: a temporary folder)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # what a DataLoader worker gets

    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(args.out or scratch)
        laion_filter = LAIONFilter()
        manifest = write_synthetic_shards(folder, num_samples=args.samples, num_shards=args.shards,
                                          resolution=args.source_resolution, fail_fractions=HALF_FAILING,
                                          laion_filter=laion_filter, noise=args.noise, quality=90, seed=0)
        shards = [str(folder / name) for name in manifest["shards"]]
        mean_kb = sum((folder / name).stat().st_size for name in manifest["shards"]) / args.samples / 1024
        build = {"plain": plain_pipeline, "ours": our_pipeline}
        best: dict[str, float] = {}
        delivered: dict[str, int] = {}
        for _ in range(args.repeats):
            for name, pipeline in build.items():
                seconds, count = timed(pipeline(shards, laion_filter, args.resolution, args.compressor_resolution,
                                                args.batch_size))
                best[name] = min(seconds, best.get(name, float("inf")))
                delivered[name] = count

    if delivered["plain"] != delivered["ours"]:
        print(f"pipelines disagree: plain delivered {delivered['plain']}, ours {delivered['ours']}")
        return 1
    rate = {name: args.samples / seconds for name, seconds in best.items()}
    ratio = rate["ours"] / rate["plain"]
    print(f"shards: {args.samples} samples of {args.source_resolution}-px JPEG (~{mean_kb:.0f} KB per sample), "
          f"{args.samples - delivered['ours']} failing the LAION filter")
    print(f"target: {args.resolution}-px stage crop + {args.compressor_resolution}-px compressor crop, "
          f"batch {args.batch_size}, one worker (1 torch thread), best of {args.repeats}")
    print(f"plain (decode full size -> filter -> torchvision resize): {rate['plain']:7.1f} samples/s per worker")
    print(f"ours  (filter json -> JPEG draft decode -> crop resize):   {rate['ours']:7.1f} samples/s per worker")
    print(f"speed-up: {ratio:.2f}x (required >= 2x: {'PASS' if ratio >= 2 else 'FAIL'})")
    print(json.dumps({"plain_samples_per_s": round(rate["plain"], 2), "ours_samples_per_s": round(rate["ours"], 2),
                      "ratio": round(ratio, 2)}))
    return 0 if ratio >= 2 else 1


if __name__ == "__main__":
    sys.exit(main())
