"""A local folder of captioned images (``cat.jpg`` + ``cat.txt``), the format most users have, read as
WebDataset shards so the same stream, transforms, resume position and data stats apply.

``ImageFolderSource.pack`` writes the pairs once into tar shards under a cache folder named after the
folder's contents (names, sizes, modification times): the image bytes unchanged (``.jpg``/``.jpeg`` →
``jpg``, ``.png``, ``.webp``), the caption as ``txt`` and a ``json`` with ``original_width`` /
``original_height`` read from the image header. Changing the folder makes a new cache; an unchanged
folder is packed once. Images without a caption file are skipped and counted (logged).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import socket
import tarfile
from pathlib import Path

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}
DONE = "image_folder.json"  # written last into the shard folder: the pack is complete


def find_pairs(folder: str | Path) -> tuple[list[tuple[Path, Path]], list[Path]]:
    """(image, caption) pairs under ``folder`` (recursive, sorted) and the images without a caption."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"data.image_folder.path={folder} is not a folder of images with .txt captions")
    pairs, uncaptioned = [], []
    for image in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
        caption = image.with_suffix(".txt")
        (pairs.append((image, caption)) if caption.is_file() else uncaptioned.append(image))
    if not pairs:
        raise ValueError(
            f"data.image_folder.path={folder} holds no image with a caption: put `name.txt` beside each "
            f"`name.jpg` (or .png/.webp); {len(uncaptioned)} image(s) without captions found"
        )
    return pairs, uncaptioned


def folder_digest(folder: Path, pairs: list[tuple[Path, Path]]) -> str:
    digest = hashlib.sha256()
    for image, caption in pairs:
        for path in (image, caption):
            stat = path.stat()
            digest.update(f"{path.relative_to(folder)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


class ImageFolderSource:
    """``path``: the folder; ``cache_dir``: where its shards go; ``per_shard``: samples per tar."""

    def __init__(self, path: str | Path, cache_dir: str | Path, per_shard: int = 1000):
        self.path = Path(path)
        self.pairs, self.uncaptioned = find_pairs(self.path)
        self.per_shard = max(1, int(per_shard))
        self.shard_dir = Path(cache_dir) / f"{self.path.name}-{folder_digest(self.path, self.pairs)}"

    def packed(self) -> bool:
        return (self.shard_dir / DONE).is_file()

    def pack(self) -> Path:
        """Writes the shards (once); returns their folder."""
        if self.packed():
            return self.shard_dir
        from PIL import Image

        if self.uncaptioned:
            log.warning("data: %d image(s) in %s have no .txt caption and are skipped, e.g. %s",
                        len(self.uncaptioned), self.path, self.uncaptioned[0])
        staging = self.shard_dir.with_name(f".{self.shard_dir.name}.tmp-{socket.gethostname()}-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            for start in range(0, len(self.pairs), self.per_shard):
                with tarfile.open(staging / f"{start // self.per_shard:05d}.tar", "w") as tar:
                    for index, (image, caption) in enumerate(self.pairs[start:start + self.per_shard], start):
                        key = f"{index:08d}"
                        data = image.read_bytes()
                        try:
                            with Image.open(io.BytesIO(data)) as opened:
                                width, height = opened.size
                        except OSError:  # undecodable: the stream skips and counts it like a broken shard sample
                            width = height = None
                        meta = {"original_width": width, "original_height": height,
                                "source": str(image.relative_to(self.path))}
                        for suffix, payload in ((IMAGE_SUFFIXES[image.suffix.lower()], data),
                                                ("txt", caption.read_bytes()), ("json", json.dumps(meta).encode())):
                            info = tarfile.TarInfo(f"{key}.{suffix}")
                            info.size = len(payload)
                            tar.addfile(info, io.BytesIO(payload))
            (staging / DONE).write_text(json.dumps({"folder": str(self.path), "samples": len(self.pairs),
                                                    "skipped_uncaptioned": len(self.uncaptioned)}))
            self.shard_dir.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.replace(staging, self.shard_dir)
            except OSError:
                if not self.packed():  # another node's pack finished first: use it
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        log.info("data: packed %d captioned images of %s into %s", len(self.pairs), self.path, self.shard_dir)
        return self.shard_dir
