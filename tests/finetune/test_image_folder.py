"""A folder of ``.jpg`` + ``.txt`` pairs as a data source (data/image_folder.py): packed once into
WebDataset shards, streamed by the same data module and transforms, usable by a fine-tune run."""

from __future__ import annotations

import tarfile

import numpy as np
import pytest
from PIL import Image

from wurst.data.datamodule import WurstDataModule
from wurst.data.image_folder import ImageFolderSource

from .conftest import launch


def write_folder(folder, count: int = 5, uncaptioned: int = 1):
    rng = np.random.default_rng(0)
    for i in range(count + uncaptioned):
        place = folder / ("nested" if i % 2 else "")
        place.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (100 + i, 120, 3), dtype=np.uint8)).save(place / f"photo{i}.jpg")
        if i < count:
            (place / f"photo{i}.txt").write_text(f"a photo of a zorblat number {i}")
    return folder


def data_module(folder, cache, batch: int = 5) -> WurstDataModule:
    return WurstDataModule(shards=None, global_batch_size=batch, num_workers=0, mode="finite", shuffle=False,
                           resolution=96, filter=None, image_folder={"path": str(folder), "cache_dir": str(cache)})


def test_captioned_images_stream_through_the_data_module_and_uncaptioned_ones_are_skipped(tmp_path):
    folder = write_folder(tmp_path / "photos")
    module = data_module(folder, tmp_path / "cache")
    module.setup()
    batch = next(iter(module.train_dataloader()))
    assert sorted(batch["captions"]) == sorted(f"a photo of a zorblat number {i}" for i in range(5))
    assert tuple(batch["images"].shape) == (5, 3, 96, 96)


def test_the_shards_hold_the_image_bytes_unchanged_and_the_original_size(tmp_path):
    folder = write_folder(tmp_path / "photos", count=2, uncaptioned=0)
    shard_dir = ImageFolderSource(folder, tmp_path / "cache").pack()
    with tarfile.open(next(shard_dir.glob("*.tar"))) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    # Sorted by path: nested/photo1.jpg, then photo0.jpg.
    assert members["00000000.jpg"] == (folder / "nested" / "photo1.jpg").read_bytes()
    assert members["00000001.jpg"] == (folder / "photo0.jpg").read_bytes()
    assert b'"original_width": 120, "original_height": 101' in members["00000000.json"]


def test_an_unchanged_folder_is_packed_once_and_a_changed_one_again(tmp_path):
    folder = write_folder(tmp_path / "photos")
    first = ImageFolderSource(folder, tmp_path / "cache").pack()
    written = first.joinpath("00000.tar").stat().st_mtime_ns
    assert ImageFolderSource(folder, tmp_path / "cache").pack().joinpath("00000.tar").stat().st_mtime_ns == written
    (folder / "photo0.txt").write_text("a different caption")
    assert ImageFolderSource(folder, tmp_path / "cache").shard_dir != first


def test_a_folder_without_captions_is_a_clear_error(tmp_path):
    folder = write_folder(tmp_path / "photos", count=0, uncaptioned=2)
    with pytest.raises(ValueError, match=r"no image with a caption: put `name.txt` beside each"):
        ImageFolderSource(folder, tmp_path / "cache")


@pytest.mark.slow
def test_a_lora_fine_tune_trains_on_an_image_folder(base_pipeline, launcher, tmp_path):
    folder = write_folder(tmp_path / "photos", count=8, uncaptioned=0)
    out = tmp_path / "out"
    output = launch(launcher, [
        "experiment=finetune/stage_c_lora", f"finetune.base={base_pipeline}", "data=image_folder",
        f"data.image_folder.path={folder}", f"paths.output_dir={out}", f"paths.data_dir={tmp_path / 'data'}",
        "stage.data.compressor_size=96", "data.global_batch_size=4", "data.num_workers=0", "trainer.max_steps=2",
        "checkpoint_every=2", "logger=csv", "callbacks.progress_bar=false",
    ], tmp_path / "run.log")
    export = out / "finetune" / "stage_c_lora" / "export"
    assert (export / "lora" / "pytorch_lora_weights.safetensors").is_file(), output[-2000:]
    card = (export / "lora" / "README.md").read_text()
    assert "- Data: `photos`" in card and "- Base model: `tiny`" in card  # the card names the data and the base
    assert str(tmp_path) not in card  # and publishes no local path
