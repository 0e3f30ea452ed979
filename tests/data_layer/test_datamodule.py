"""The data module: built from conf/data/*.yaml, synthesizes the tiny data, and resumes under Lightning."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import nn

from wurst.data.datamodule import WurstDataModule, per_device_batch_size
from wurst.data.laion_filter import LAIONFilter

from .conftest import CONF_DIR


def data_config(*overrides: str):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose(overrides=["+paths=default", *overrides]).data


def test_the_synthetic_config_writes_its_shards_and_yields_tiny_batches(tmp_path, monkeypatch):
    monkeypatch.setenv("WURST_DATA_DIR", str(tmp_path))
    config = data_config("+data=synthetic", "data.num_workers=0", "data.synthesize.num_samples=48",
                         "data.synthesize.num_shards=2")
    module = instantiate(config, _convert_="all")
    assert isinstance(module, WurstDataModule) and isinstance(module.image_args["laion_filter"], LAIONFilter)
    module.prepare_data()
    assert len(list((tmp_path / "synthetic").glob("*.tar"))) == 2
    batch = next(iter(module.train_dataloader()))
    assert batch["images"].shape == (8, 3, 128, 128)  # contract: 128-px images -> Stage A latent 4x32x32
    assert batch["compressor_images"].shape == (8, 3, 96, 96)  # compressor at 96 px -> 16x3x3
    assert set(batch) >= {"captions", "keys", "data_stats", "data_position"}


def test_the_laion_config_takes_phase_overrides_and_buckets():
    config = data_config("+data=laion", "data.shards='/nonexistent/{0..1}.tar'", "data.global_batch_size=1536",
                         "data/buckets=multi_aspect", "data.filter.min_aesthetic=6.0")
    assert config.filter.min_aesthetic == 6.0 and config.filter.max_punsafe == 0.99
    assert (config.resolution, config.compressor_resolution, config.mode) == (512, 384, "resampled")
    module = instantiate(config, _convert_="all")
    assert len(module.image_args["buckets"].buckets) == 7


def test_the_per_device_batch_divides_the_global_batch_exactly():
    assert per_device_batch_size(512, world_size=8, accumulate_grad_batches=2) == 32
    with pytest.raises(ValueError, match="1536 is not divisible by world size 7"):
        per_device_batch_size(1536, world_size=7)
    with pytest.raises(ValueError, match="global_batch_size=None"):
        per_device_batch_size(None, world_size=1)


class KeyRecorder(L.LightningModule):
    """Records the sample keys of every batch it trains on."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(1, 1)
        self.seen: list[list[str]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(list(batch["keys"]))
        return self.layer(batch["images"].mean().view(1, 1)).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def fit(shards, max_steps, ckpt_path=None, save_to=None) -> list[list[str]]:
    datamodule = WurstDataModule(str(shards), batch_size=4, num_workers=0, shuffle_buffer=16,
                                 resample_block_shards=2, resolution=8, filter=LAIONFilter())
    module = KeyRecorder()
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    if save_to is not None:
        trainer.save_checkpoint(save_to)
    return module.seen


@pytest.mark.slow
def test_a_lightning_run_resumed_from_its_checkpoint_continues_the_data_stream(clean_shards, tmp_path):
    folder, _ = clean_shards
    uninterrupted = fit(folder, 10)
    first = fit(folder, 4, save_to=tmp_path / "step4.ckpt")  # Lightning had already fetched batch 5
    rest = fit(folder, 10, ckpt_path=tmp_path / "step4.ckpt")
    assert first + rest == uninterrupted


def test_validation_batches_are_centre_cropped_and_restart_every_pass(clean_shards):
    folder, _ = clean_shards
    datamodule = WurstDataModule(f"{folder}/{{00000..00005}}.tar", batch_size=4, num_workers=0, resolution=8,
                                 filter=LAIONFilter(), val_shards=f"{folder}/{{00006..00007}}.tar")
    loader = datamodule.val_dataloader()
    first_pass = [(b["keys"], b["images"]) for b in loader]
    second_pass = [(b["keys"], b["images"]) for b in loader]
    assert [k for k, _ in first_pass] == [k for k, _ in second_pass]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(first_pass, second_pass))
    assert all(k.startswith(("00006", "00007")) for keys, _ in first_pass for k in keys)
    # Lightning sees a val_dataloader only when there are validation shards
    assert is_overridden("val_dataloader", datamodule, L.LightningDataModule)
    assert not is_overridden("val_dataloader", WurstDataModule(str(folder), batch_size=4), L.LightningDataModule)
