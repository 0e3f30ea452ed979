"""Image folders of an evaluation: reading, the reference preprocessing, atomic PNG writes.

The reference preprocessing (used for COCO-30K references *and* for every image entering FID/IS, so
both sides of the comparison are treated alike): convert to RGB, resize the short side to the FID
resolution with PIL's antialiased bicubic filter, centre-crop a square of that side.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from wurst.eval.prompt_set import PromptRecord

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    """RGB ``size``×``size``: short side resized to ``size`` (bicubic, antialiased), centre crop."""
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive int (pixels), got {size!r}")
    image = image.convert("RGB")
    width, height = image.size
    if (width, height) != (size, size):
        scale = size / min(width, height)
        new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
        left, top = (new_w - size) // 2, (new_h - size) // 2
        image = image.crop((left, top, left + size, top + size))
    return image


def load_rgb(path: str | Path) -> Image.Image:
    """Decode an image file to RGB (fully loaded, file closed)."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError) as error:
        raise ValueError(f"image file {path} cannot be decoded ({error}); delete or replace it") from error


def to_uint8_batch(images: Sequence[Image.Image]) -> torch.Tensor:
    """Same-size RGB PIL images → ``[B, 3, H, W]`` uint8 (the input torchmetrics' Inception takes)."""
    arrays = [np.asarray(image.convert("RGB"), dtype=np.uint8) for image in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def to_pil(image: torch.Tensor) -> Image.Image:
    """``[3, H, W]`` float in [0, 1] → RGB PIL image (rounded to 8 bits)."""
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected an image tensor [3, H, W], got shape {tuple(image.shape)}")
    array = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)


def write_png_atomic(image: Image.Image, path: str | Path) -> Path:
    """Write a PNG so that ``path`` either does not exist or is complete: temp file + rename.

    An interrupted run leaves at most a ``.<name>.partial-<pid>`` file, which resume ignores.
    """
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    image.save(partial, format="PNG")
    os.replace(partial, path)
    return path


def list_images(folder: str | Path, what: str = "image folder") -> list[Path]:
    """Image files directly in ``folder`` (sorted by name); an error if there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{what} {folder} does not exist or is not a folder")
    paths = sorted(
        p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    )
    if not paths:
        raise FileNotFoundError(f"{what} {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return paths


def images_for_prompts(
    folder: str | Path, records: Sequence[PromptRecord], what: str = "images"
) -> list[Path]:
    """``<folder>/<id>.<ext>`` for each prompt, in prompt order; names the missing ones if any."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{what} folder {folder} does not exist; generate first (set `pipeline=`) or point `images=` at "
            "a folder of <id>.png"
        )
    by_stem: dict[str, Path] = {}
    for path in folder.iterdir():
        if path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith("."):
            by_stem.setdefault(path.stem, path)
    missing = [r.id for r in records if r.id not in by_stem]
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise FileNotFoundError(
            f"{what} folder {folder} lacks {len(missing)} of {len(records)} prompt images ({shown}); "
            "finish generation (it resumes where it stopped) or pass `limit=` to score fewer prompts"
        )
    return [by_stem[r.id] for r in records]
