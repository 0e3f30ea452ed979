"""Decoding and the per-stage image transforms.

Each stage sees a square crop at its resolution and, beside it, the same crop at the semantic
compressor's resolution (REFERENCE.md "Compression": 512-px training images feed the compressor at
384 px -> 12x12 latents; 1024 feed it at 768 -> 24x24). Stage C's phase 3 trains on mixed aspect
ratios, so there the crop is the nearest of a few aspect buckets of about the same area.

JPEGs much larger than the target are decoded with PIL's draft mode: libjpeg scales the DCT by 1/2,
1/4 or 1/8 while decoding, so a 2048-px LAION original destined for a 512-px crop costs a fraction of
a full decode. The final resize is still an antialiased bicubic one from an image at least as large as
the target.
"""

from __future__ import annotations

import io
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")

# Decode at reduced scale only when the source is at least this many times the target: libjpeg's
# draft scales are 1/2, 1/4, 1/8, so below 2x there is nothing to gain.
_DRAFT_MIN_FACTOR = 2.0
# Images that decode but hold no usable picture are skipped (counted as bad_image_size): LAION's
# 1x1 "image unavailable" placeholders and slivers a few pixels high, whose json still claims the
# original size; and banners longer than 4:1, of which a square crop keeps under a quarter.
MIN_IMAGE_SIDE = 8
MAX_ASPECT_RATIO = 4.0
# PIL modes of 16-bit grayscale (PNG, TIFF): convert("RGB") clips them at 255, so most pixels turn white.
_SIXTEEN_BIT_GRAY = ("I", "I;16", "I;16B", "I;16L", "I;16N")


class ImageSizeError(ValueError):
    """An image that decodes but is too small or too elongated to train on."""


def check_image_size(width: int, height: int) -> None:
    """Raises :class:`ImageSizeError` for a side under MIN_IMAGE_SIDE or an aspect beyond MAX_ASPECT_RATIO."""
    if min(width, height) < MIN_IMAGE_SIDE:
        raise ImageSizeError(f"image is {width}x{height} px, under {MIN_IMAGE_SIDE} px on a side (a placeholder)")
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise ImageSizeError(f"image is {width}x{height} px, longer than {MAX_ASPECT_RATIO:g}:1 (a banner or sliver)")


def open_image(data: bytes) -> Image.Image:
    """Open an encoded image lazily (the header is read, the pixels are not yet decoded)."""
    return Image.open(io.BytesIO(data))


def decode_rgb(image: Image.Image, cover_size: tuple[int, int] | None = None) -> Image.Image:
    """Decode ``image`` (from :func:`open_image`) to RGB, via draft mode when much larger than needed.

    cover_size: (width, height) the result must still cover after an aspect-preserving resize.
    Transparent images are composited on white (LAION's transparent PNG logos would turn black).
    """
    if cover_size is not None and image.format == "JPEG":
        width, height = image.size
        scale = max(cover_size[0] / width, cover_size[1] / height)
        if scale * _DRAFT_MIN_FACTOR <= 1.0:
            image.draft("RGB", (math.ceil(width * scale), math.ceil(height * scale)))
    if image.mode in _SIXTEEN_BIT_GRAY:
        levels = np.asarray(image).astype(np.int64).clip(0, 65535) >> 8
        return Image.fromarray(levels.astype(np.uint8), mode="L").convert("RGB")
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def resize_crop(image: Image.Image, size_hw: tuple[int, int], rng: random.Random | None) -> Image.Image:
    """Scale to cover ``size_hw`` (height, width) and crop it: random offset with ``rng``, else centred.

    One bicubic resize of just the source region that lands in the crop (PIL's ``box``), so the
    discarded margins are never resampled.
    """
    height, width = size_hw
    src_w, src_h = image.size
    scale = max(width / src_w, height / src_h)
    box_w, box_h = width / scale, height / scale
    spare_w, spare_h = src_w - box_w, src_h - box_h
    left = rng.uniform(0, spare_w) if rng else spare_w / 2
    top = rng.uniform(0, spare_h) if rng else spare_h / 2
    return image.resize((width, height), Image.Resampling.BICUBIC, box=(left, top, left + box_w, top + box_h))


def to_uint8_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> uint8 ``[3, H, W]`` (batches are converted to float in [0, 1] once, after stacking)."""
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)


@dataclass(frozen=True)
class Bucket:
    """One target shape: the stage image and (optionally) the compressor image, both (height, width)."""

    image_size: tuple[int, int]
    compressor_size: tuple[int, int] | None


def _round_to(value: float, multiple: int) -> int:
    return max(multiple, round(value / multiple) * multiple)


class AspectBuckets:
    """Aspect-ratio buckets of about ``resolution**2`` pixels, for Stage C's phase-3 mixed aspect ratios.

    With a compressor resolution, buckets are laid out on the compressor's latent grid (stride 32):
    a bucket of aspect w/h has an integer latent grid of about ``(compressor_resolution/32)**2`` cells,
    so Stage C's latents are exact; the stage image is that grid scaled by resolution /
    compressor_resolution (rounded to 8 px). Without one, image sides are multiples of 64 px.
    """

    def __init__(self, resolution: int, compressor_resolution: int | None = None,
                 aspect_ratios: Sequence[float] = (1.0, 0.75, 4 / 3, 0.5625, 16 / 9)):
        if not aspect_ratios or any(a <= 0 for a in aspect_ratios):
            raise ValueError(f"data.buckets.aspect_ratios={list(aspect_ratios)} must be a non-empty list of "
                             "positive width/height ratios, e.g. [1.0, 0.75, 1.333]")
        buckets: dict[tuple[int, int], Bucket] = {}
        for aspect in aspect_ratios:
            root = math.sqrt(aspect)
            if compressor_resolution:
                cells = compressor_resolution / 32
                grid_h, grid_w = max(1, round(cells / root)), max(1, round(cells * root))
                compressor_size = (32 * grid_h, 32 * grid_w)
                ratio = resolution / compressor_resolution
                image_size = (_round_to(compressor_size[0] * ratio, 8), _round_to(compressor_size[1] * ratio, 8))
            else:
                compressor_size = None
                image_size = (_round_to(resolution / root, 64), _round_to(resolution * root, 64))
            buckets.setdefault(image_size, Bucket(image_size, compressor_size))
        self.buckets = list(buckets.values())
        self._log_aspects = [math.log(b.image_size[1] / b.image_size[0]) for b in self.buckets]

    def assign(self, width: int, height: int) -> int:
        """Index of the bucket whose aspect ratio is nearest (in log space) to width/height."""
        log_aspect = math.log(width / height)
        return min(range(len(self.buckets)), key=lambda i: abs(self._log_aspects[i] - log_aspect))


class StageTransform:
    """Encoded image bytes -> the stage crop and the compressor crop, as uint8 tensors.

    resolution: side of the square stage crop (ignored when ``buckets`` is given).
    compressor_resolution: side of the compressor's square input, or None for no compressor images.
    random_crop: random crop offsets (training) or centred (evaluation, caching).
    """

    def __init__(self, resolution: int, compressor_resolution: int | None = None, random_crop: bool = True,
                 buckets: AspectBuckets | None = None):
        if resolution <= 0 or (compressor_resolution is not None and compressor_resolution <= 0):
            raise ValueError(f"data.resolution={resolution} and data.compressor_resolution="
                             f"{compressor_resolution} must be positive pixel sizes (e.g. 512 and 384)")
        self.random_crop = random_crop
        self.buckets = buckets
        square_compressor = (compressor_resolution,) * 2 if compressor_resolution else None
        self.square = Bucket((resolution, resolution), square_compressor)

    def __call__(self, data: bytes, rng: random.Random) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """Returns (image uint8 [3, H, W], compressor image uint8 [3, h, w] or None, bucket index).

        Raises PIL's errors (OSError, ValueError...) for bytes that are not a decodable image, and
        :class:`ImageSizeError` (from the header, before decoding) for unusable sizes.
        """
        image = open_image(data)
        check_image_size(*image.size)
        index = self.buckets.assign(*image.size) if self.buckets else 0
        bucket = self.buckets.buckets[index] if self.buckets else self.square
        height, width = bucket.image_size
        crop = resize_crop(decode_rgb(image, (width, height)), bucket.image_size, rng if self.random_crop else None)
        compressor = None
        if bucket.compressor_size is not None:
            compressor_h, compressor_w = bucket.compressor_size
            # Antialiased bilinear (torchvision's default Resize): half the cost of bicubic, and the
            # compressor only needs the semantics of a 0.75x downscale.
            compressor = to_uint8_tensor(crop.resize((compressor_w, compressor_h), Image.Resampling.BILINEAR))
        return to_uint8_tensor(crop), compressor, index
