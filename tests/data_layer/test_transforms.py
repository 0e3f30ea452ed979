"""Decoding and per-stage transforms: draft-mode JPEG decode, crops, aspect buckets, captions."""

from __future__ import annotations

import io
import random

import pytest
from PIL import Image

from wurst.data.captions import clean_caption
from wurst.data.laion_filter import LAIONFilter
from wurst.data.shard_stream import ImageShardStream
from wurst.data.stream_loader import StreamLoader
from wurst.data.synthetic import write_synthetic_shards
from wurst.data.transforms import AspectBuckets, StageTransform, decode_rgb, open_image, resize_crop


def jpeg(width, height, color=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format="JPEG")
    return buffer.getvalue()


def test_a_much_larger_jpeg_is_decoded_at_reduced_scale():
    image = decode_rgb(open_image(jpeg(1024, 768)), cover_size=(128, 128))
    assert image.size == (256, 192)  # libjpeg's 1/4 scale: still covers 128x128, a 16th of the pixels


def test_a_jpeg_near_the_target_size_is_decoded_in_full():
    assert decode_rgb(open_image(jpeg(300, 300)), cover_size=(256, 256)).size == (300, 300)
    assert decode_rgb(open_image(jpeg(1024, 768))).size == (1024, 768)


def test_transparent_images_are_composited_on_white():
    buffer = io.BytesIO()
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(buffer, format="PNG")
    assert decode_rgb(open_image(buffer.getvalue())).getpixel((4, 4)) == (255, 255, 255)


def test_centre_crop_is_deterministic_and_random_crop_moves():
    image = Image.linear_gradient("L").transpose(Image.Transpose.ROTATE_90).convert("RGB").resize((256, 128))
    centre = [resize_crop(image, (64, 64), None).tobytes() for _ in range(2)]
    assert centre[0] == centre[1]
    crops = {resize_crop(image, (64, 64), random.Random(seed)).tobytes() for seed in range(5)}
    assert len(crops) > 1


def test_the_compressor_image_is_the_same_crop_at_its_own_resolution():
    image, compressor, _ = StageTransform(512, 384, random_crop=False)(jpeg(1024, 1024), random.Random(0))
    assert tuple(image.shape) == (3, 512, 512) and tuple(compressor.shape) == (3, 384, 384)
    assert abs(image.float().mean() - compressor.float().mean()) < 1.0


@pytest.mark.parametrize("resolution, compressor_resolution, grid", [(512, 384, 12), (1024, 768, 24)])
def test_square_buckets_give_the_reference_latent_grids(resolution, compressor_resolution, grid):
    buckets = AspectBuckets(resolution, compressor_resolution, [1.0, 0.75, 16 / 9])
    square = buckets.buckets[buckets.assign(1000, 1000)]
    assert square.image_size == (resolution, resolution)
    assert square.compressor_size == (32 * grid, 32 * grid)
    for bucket in buckets.buckets:  # whole compressor latents, about the same number of them
        h, w = bucket.compressor_size
        assert h % 32 == 0 and w % 32 == 0
        assert abs(h * w / 32**2 - grid**2) <= 0.1 * grid**2


def test_an_image_goes_to_the_bucket_nearest_its_aspect_ratio():
    buckets = AspectBuckets(512, 384, [1.0, 0.5625, 16 / 9])
    wide = buckets.buckets[buckets.assign(1920, 1080)]
    assert wide.image_size[1] > wide.image_size[0]
    assert buckets.buckets[buckets.assign(1080, 1920)].image_size[0] > buckets.buckets[buckets.assign(1080, 1920)].image_size[1]


def test_bucketed_batches_hold_one_aspect_each_and_mix_across_batches(tmp_path):
    write_synthetic_shards(tmp_path, num_samples=60, num_shards=2, resolution=32, aspect_ratios=(1.0, 2.0, 0.5),
                           fail_fractions={})
    stream = ImageShardStream(str(tmp_path), 4, mode="finite", shuffle=False, resolution=128,
                              compressor_resolution=96, buckets=AspectBuckets(128, 96, [1.0, 2.0, 0.5]),
                              laion_filter=LAIONFilter())
    shapes = {tuple(b["images"].shape[2:]) + tuple(b["compressor_images"].shape[2:]) for b in StreamLoader(stream)}
    assert len(shapes) == 3


def test_captions_are_unescaped_repaired_and_whitespace_collapsed():
    assert clean_caption(b"  Fish &amp; chips\n\n at  the\tpier ") == "Fish & chips at the pier"
    assert clean_caption("caf\u00c3\u00a9 au lait") == "café au lait"
