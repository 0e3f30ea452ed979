"""``wurst-data``: synthetic shards, the latent cache, shard inspection.

Subcommands live in a registry. Another package adds one (``coco30k`` from ``eval``) without this
package importing it: it defines a :class:`Subcommand` and declares it as an entry point,

    [project.entry-points."wurst.data_subcommands"]
    coco30k = "wurst.eval.coco30k:SUBCOMMAND"

or calls :func:`register_subcommand` before :func:`main`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path

from omegaconf import OmegaConf

from wurst.data.laion_filter import LAIONFilter

ENTRY_POINT_GROUP = "wurst.data_subcommands"


@dataclass(frozen=True)
class Subcommand:
    """One ``wurst-data <name>``: its arguments and what it runs (returns an exit status or None)."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]


SUBCOMMANDS: dict[str, Subcommand] = {}


def register_subcommand(subcommand: Subcommand) -> Subcommand:
    if subcommand.name in SUBCOMMANDS and SUBCOMMANDS[subcommand.name] != subcommand:
        raise ValueError(f"wurst-data: a subcommand named {subcommand.name!r} is already registered")
    SUBCOMMANDS[subcommand.name] = subcommand
    return subcommand


def load_filter(spec: str | None) -> LAIONFilter | None:
    """``laion`` (REFERENCE thresholds), ``none`` (no filter) or a yaml file of LAIONFilter fields."""
    if spec is None or spec == "laion":
        return LAIONFilter()
    if spec == "none":
        return None
    if not Path(spec).is_file():
        raise SystemExit(f"wurst-data: --filter {spec!r} is not 'laion', 'none' or an existing yaml file "
                         "(e.g. conf/data/filter/laion.yaml)")
    fields = OmegaConf.to_container(OmegaConf.load(spec), resolve=True)
    fields.pop("_target_", None)
    return LAIONFilter(**fields)


def _key_values(text: str, cast: Callable[[str], float | int], what: str) -> dict:
    if not text:
        return {}
    try:
        return {k.strip(): cast(v) for k, v in (item.split("=") for item in text.split(","))}
    except ValueError as error:
        raise SystemExit(f"wurst-data: {what} {text!r} must look like name=value,name=value ({error})") from error


# --- synth -------------------------------------------------------------------------------------------


def _synth_arguments(parser: argparse.ArgumentParser) -> None:
    from wurst.data.synthetic import CORRUPTIONS, DEFAULT_FAIL_FRACTIONS, FILTER_FAILURES

    parser.add_argument("--out", required=True, help="output folder for the shards and manifest.json")
    parser.add_argument("--samples", type=int, default=512, help="samples in total (default 512)")
    parser.add_argument("--shards", type=int, default=8, help="number of tar shards (default 8)")
    parser.add_argument("--resolution", type=int, default=128, help="image side in px (default 128)")
    parser.add_argument("--seed", type=int, default=0)
    default_fail = ",".join(f"{k}={v}" for k, v in DEFAULT_FAIL_FRACTIONS.items())
    parser.add_argument("--fail", default=default_fail,
                        help=f"fraction failing each filter rule ({', '.join(FILTER_FAILURES)}); default {default_fail}")
    parser.add_argument("--corrupt", default="",
                        help=f"corrupt samples per kind ({', '.join(CORRUPTIONS)}), e.g. truncated_jpg=2,bad_json=1")
    parser.add_argument("--truncate-last-shard", action="store_true", help="cut the last shard mid-image")
    parser.add_argument("--aspect-ratios", default="1.0", help="comma-separated width/height ratios")
    parser.add_argument("--noise", type=float, default=0.0, help="grain sigma, for photo-like JPEG sizes")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality")
    parser.add_argument("--filter", default="laion", help="thresholds to design against: laion or a yaml file")


def _synth(args: argparse.Namespace) -> int:
    from wurst.data.synthetic import write_synthetic_shards

    manifest = write_synthetic_shards(
        args.out, num_samples=args.samples, num_shards=args.shards, resolution=args.resolution, seed=args.seed,
        fail_fractions=_key_values(args.fail, float, "--fail"), corrupt=_key_values(args.corrupt, int, "--corrupt"),
        truncate_last_shard=args.truncate_last_shard, laion_filter=load_filter(args.filter) or LAIONFilter(),
        aspect_ratios=[float(a) for a in args.aspect_ratios.split(",")], noise=args.noise, quality=args.quality)
    print(f"wrote {manifest['num_shards']} shards, {manifest['num_samples']} samples to {args.out}")
    print(f"a reader with the filter should count: {manifest['expected']}")
    return 0


# --- cache -------------------------------------------------------------------------------------------


def _cache_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shards", required=True, help="source image shards (a shard spec)")
    parser.add_argument("--out", required=True, help="output folder for the cached shards")
    parser.add_argument("--compressor", required=True,
                        help="semantic compressor config: yaml/json with _target_ (e.g. a Stage B export's "
                             "compressor_config.json or conf/model/compressor/paper.yaml)")
    parser.add_argument("--compressor-weights", default=None, help="safetensors for it (compressor.safetensors)")
    parser.add_argument("--text-encoder", required=True, help="text encoder config: yaml/json with _target_")
    parser.add_argument("--resolution", type=int, default=512, help="stage crop side (default 512)")
    parser.add_argument("--compressor-resolution", type=int, default=384, help="compressor input side (384)")
    parser.add_argument("--filter", default="laion", help="laion, none, or a yaml of LAIONFilter fields")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")


def _cache(args: argparse.Namespace) -> int:
    from wurst.data.latent_cache import cache_shards

    summary = cache_shards(args.shards, args.out, args.compressor, args.text_encoder,
                           compressor_weights=args.compressor_weights, resolution=args.resolution,
                           compressor_resolution=args.compressor_resolution, laion_filter=load_filter(args.filter),
                           batch_size=args.batch_size, num_workers=args.num_workers, device=args.device)
    print(json.dumps(summary, indent=1))
    return 0


# --- inspect -----------------------------------------------------------------------------------------


def _inspect_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("shards", help="a shard spec: brace pattern, folder, glob, pipe: or fsspec URL")
    parser.add_argument("--filter", default="laion", help="laion, none, or a yaml of LAIONFilter fields")
    parser.add_argument("--limit", type=int, default=None, help="read at most this many samples")
    parser.add_argument("--json", default=None, help="also write the report as JSON to this path")


def _inspect(args: argparse.Namespace) -> int:
    from wurst.data.inspect_shards import format_report, inspect_shards

    report = inspect_shards(args.shards, load_filter(args.filter), args.limit)
    print(format_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


register_subcommand(Subcommand("synth", "write synthetic LAION-format shards (img2dataset layout)",
                               _synth_arguments, _synth))
register_subcommand(Subcommand("cache", "precompute frozen-encoder outputs (compressor latents, text states)",
                               _cache_arguments, _cache))
register_subcommand(Subcommand("inspect", "sample counts, filter pass rates, caption and size histograms",
                               _inspect_arguments, _inspect))


def _load_plugins() -> None:
    for entry_point in entry_points(group=ENTRY_POINT_GROUP):
        register_subcommand(entry_point.load())


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    _load_plugins()
    parser = argparse.ArgumentParser(prog="wurst-data", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(SUBCOMMANDS) + "}")
    for subcommand in SUBCOMMANDS.values():
        sub = commands.add_parser(subcommand.name, help=subcommand.help, description=subcommand.help)
        subcommand.add_arguments(sub)
        sub.set_defaults(run=subcommand.run)
    args = parser.parse_args(argv)
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
