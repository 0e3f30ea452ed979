"""``wurst-data inspect``: what is in a set of shards, and what the LAION filter would keep.

Reads every sample once, in order, decoding no pixels (image sizes come from the file header), and
reports sample counts (total and per shard), broken-input skips by kind, the filter's overall pass
rate and each rule's own pass rate, and histograms of caption length, original and stored image size
and aesthetic score. Useful before a run (are the thresholds right for these shards?) and after
img2dataset (did it keep the metadata columns?).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections import Counter
from collections.abc import Sequence
from typing import Any

from wurst.data import data_stats as kinds
from wurst.data.laion_filter import LAIONFilter
from wurst.data.shard_spec import expand_shards
from wurst.data.shard_stream import Reader, judge_sample, tar_to_samples
from wurst.data.transforms import IMAGE_EXTENSIONS, open_image

WORD_BINS = (0, 3, 5, 10, 20, 40)
SIZE_BINS = (0, 256, 512, 1024, 2048, 4096)
AESTHETIC_BINS = (0.0, 4.0, 5.0, 6.0, 7.0)


def _bin(value: float | None, edges: Sequence[float]) -> str:
    if value is None:
        return "missing"
    lower = max((e for e in edges if e <= value), default=edges[0])
    index = edges.index(lower)
    return f">={lower:g}" if index == len(edges) - 1 else f"[{lower:g}, {edges[index + 1]:g})"


def _in_bin_order(histogram: Counter[str], edges: Sequence[float]) -> dict[str, int]:
    labels = [_bin(e, edges) for e in edges] + ["missing"]
    return {label: histogram[label] for label in labels if histogram[label]}


def _only_rule(laion_filter: LAIONFilter, rule: str) -> LAIONFilter:
    """A copy of the filter with every rule but ``rule`` switched off (to measure rules separately)."""
    off = {"min_original_size": None, "max_original_size": None, "max_pwatermark": None, "max_punsafe": None,
           "min_aesthetic": None, "min_caption_words": None, "ascii_only": False, "forbidden_substrings": ()}
    keep = {"size": ("min_original_size", "max_original_size"), "watermark": ("max_pwatermark",),
            "unsafe": ("max_punsafe",), "aesthetic": ("min_aesthetic",), "caption_words": ("min_caption_words",),
            "caption_ascii": ("ascii_only",), "caption_forbidden": ("forbidden_substrings",)}[rule]
    return dataclasses.replace(laion_filter, **{k: v for k, v in off.items() if k not in keep})


def inspect_shards(spec: str | Sequence[str], laion_filter: LAIONFilter | None = None,
                   limit: int | None = None) -> dict[str, Any]:
    """Statistics of the shards ``spec`` names (at most ``limit`` samples)."""
    urls = expand_shards(spec)
    laion_filter = laion_filter or LAIONFilter()
    singles = {rule: _only_rule(laion_filter, rule) for rule in laion_filter.active_rules()}
    reader = Reader(rank=0, world_size=1, worker=0, num_workers=1, epoch=0)
    per_shard: Counter[str] = Counter()
    rule_fails: Counter[str] = Counter()
    histograms: dict[str, Counter[str]] = {name: Counter() for name in
                                           ("caption_words", "original_size", "stored_size", "aesthetic")}
    checked = passed = 0
    for sample in itertools.islice(tar_to_samples(urls, reader), limit):
        per_shard[sample["__url__"]] += 1
        kind, why, caption, meta = judge_sample(sample, laion_filter)
        if kind is not None and not kind.startswith(kinds.FILTERED_PREFIX):
            reader.stats.skip(kind, f"{sample['__url__']}:{sample['__key__']}", why)
            continue
        checked += 1
        if kind is None:
            passed += 1
        else:
            reader.stats.count(kind)
        for rule, single in singles.items():
            rule_fails[rule] += single.rejection(meta, caption) is not None
        histograms["caption_words"][_bin(len(caption.split()), WORD_BINS)] += 1
        sides = [meta.get("original_width"), meta.get("original_height")]
        numeric = [s for s in sides if isinstance(s, (int, float)) and not isinstance(s, bool)]
        histograms["original_size"][_bin(max(numeric) if len(numeric) == 2 else None, SIZE_BINS)] += 1
        histograms["aesthetic"][_bin(laion_filter.aesthetic_score(meta), AESTHETIC_BINS)] += 1
        image_ext = next(ext for ext in IMAGE_EXTENSIONS if ext in sample)
        try:
            stored = max(open_image(sample[image_ext]).size)
        except Exception:  # noqa: BLE001 (PIL raises many types; not an image header, decoding would skip it)
            stored = None
        histograms["stored_size"][_bin(stored, SIZE_BINS)] += 1
    return {
        "shards": len(urls),
        "samples_read": reader.stats.counts[kinds.READ],
        "skipped": reader.stats.skipped(),
        "filter": {
            "thresholds": laion_filter.describe(),
            "checked": checked,
            "passed": passed,
            "pass_rate": passed / checked if checked else None,
            "rejected_by_first_rule": reader.stats.filtered(),
            "rule_pass_rate": {r: 1 - rule_fails[r] / checked if checked else None for r in singles},
        },
        "histograms": {name: _in_bin_order(h, edges) for (name, h), edges in
                       zip(histograms.items(), (WORD_BINS, SIZE_BINS, SIZE_BINS, AESTHETIC_BINS))},
        "samples_per_shard": dict(per_shard),
    }


def format_report(report: dict[str, Any]) -> str:
    """The report as text, with bar histograms."""
    f = report["filter"]
    rate = "n/a" if f["pass_rate"] is None else f"{100 * f['pass_rate']:.1f}%"
    lines = [f"shards: {report['shards']}   samples read: {report['samples_read']}",
             f"skipped (broken input): {report['skipped'] or 'none'}",
             f"filter: {f['thresholds']}",
             f"  passed {f['passed']} of {f['checked']} well-formed samples ({rate})",
             f"  rejected, by first failing rule: {f['rejected_by_first_rule'] or 'none'}",
             "  each rule alone passes: " + ", ".join(
                 f"{r} {100 * v:.1f}%" for r, v in f["rule_pass_rate"].items() if v is not None)]
    for name, histogram in report["histograms"].items():
        lines.append(f"{name}:")
        total = max(1, sum(histogram.values()))
        for label, count in histogram.items():
            lines.append(f"  {label:>14} {count:8d} {'#' * round(40 * count / total)}")
    counts = list(report["samples_per_shard"].values())
    if counts:
        lines.append(f"samples per shard: min {min(counts)}, max {max(counts)}, mean {sum(counts) / len(counts):.1f}")
    return "\n".join(lines)
