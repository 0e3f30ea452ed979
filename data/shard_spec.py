"""Shard specs: from what a config says to the list of tar shards a stream reads, and opening one.

A spec is a string or a list of strings. Each string may be
  - a brace pattern, img2dataset's usual naming: ``/data/laion/{00000..41407}.tar``;
  - several of those joined by ``::`` (webdataset's convention);
  - a local folder (every ``*.tar`` inside, sorted) or a glob (``/data/*.tar``);
  - a ``pipe:`` command whose stdout is the tar (``pipe:aws s3 cp s3://b/{0000..0099}.tar -``);
  - an fsspec URL (``s3://``, ``gs://``, ``https://``, ``memory://``...), also with braces, globs or a
    folder; the filesystem's package (s3fs, gcsfs) must be installed for its scheme.
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
from collections.abc import Sequence
from typing import IO

import braceexpand
import fsspec
from webdataset.gopen import gopen

log = logging.getLogger(__name__)

_GLOB_CHARS = set("*?[")


def _is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def _expand_remote(url: str) -> list[str]:
    """Globs and folders on an fsspec filesystem; a plain remote URL is trusted (no per-shard round trip)."""
    if not (_GLOB_CHARS & set(url) or url.endswith("/")):
        return [url]
    try:
        fs, path = fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as error:
        raise ValueError(
            f"data shards {url!r}: cannot open its filesystem ({error}); install the fsspec backend for "
            "this scheme (s3fs for s3://, gcsfs for gs://) or give the shards as a pipe: command"
        ) from error
    pattern = path.rstrip("/") + "/*.tar" if url.endswith("/") else path
    return [fs.unstrip_protocol(match) for match in sorted(fs.glob(pattern))]


def _expand_local(path: str) -> tuple[list[str], list[str]]:
    """(existing shard paths, missing paths) for one brace-expanded local path, folder or glob."""
    path = os.path.expanduser(os.path.expandvars(path.removeprefix("file://")))
    if os.path.isdir(path):
        return sorted(glob.glob(os.path.join(path, "*.tar"))), []
    if _GLOB_CHARS & set(path):
        return sorted(glob.glob(path)), []
    return ([path], []) if os.path.isfile(path) else ([], [path])


def expand_shards(spec: str | Sequence[str]) -> list[str]:
    """The ordered shard URLs a spec names.

    Raises ValueError for an empty spec or one that matches no shard at all; local shards that are
    named but absent (a failed img2dataset shard) are dropped with a warning.
    """
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        raise ValueError("data shards: the shard spec is empty; set data.shards to a brace pattern, folder, "
                         "glob, pipe: command or fsspec URL of your tar shards")
    pieces = spec.split("::") if isinstance(spec, str) else [str(s) for s in spec]
    if not pieces:
        raise ValueError("data shards: the shard list is empty; give at least one shard pattern")
    urls: list[str] = []
    missing: list[str] = []
    for piece in pieces:
        for url in braceexpand.braceexpand(piece.strip()):
            if url.startswith("pipe:"):
                urls.append(url)
            elif _is_remote(url):
                matched = _expand_remote(url)
                if not matched:
                    raise ValueError(f"data shards: {url!r} matched no shard; check the bucket path and pattern")
                urls.extend(matched)
            else:
                found, absent = _expand_local(url)
                urls.extend(found)
                missing.extend(absent)
    if not urls:
        shown = ", ".join(missing[:3]) + (" ..." if len(missing) > 3 else "")
        raise ValueError(f"data shards: {spec!r} matched no shard (looked for {shown or 'any *.tar'}); "
                         "check data.shards, or run `wurst-data synth --out DIR` for synthetic shards")
    if missing:
        log.warning("data shards: %d of %d named shards do not exist and are skipped (first: %s)",
                    len(missing), len(missing) + len(urls), missing[0])
    return urls


def shard_list_digest(urls: Sequence[str]) -> str:
    """A short digest of the ordered shard list, to tell a resumed run its data changed."""
    return hashlib.sha256("\n".join(urls).encode()).hexdigest()[:16]


def open_shard(url: str) -> IO[bytes]:
    """A readable byte stream for one shard: local path, ``pipe:`` command or fsspec URL."""
    if url.startswith("pipe:") or not _is_remote(url):
        return gopen(url.removeprefix("file://"), "rb")
    return fsspec.open(url, "rb").open()
