"""CarbonLedger in one process: batch sizes, samples_per_step, state round trip, bad settings."""

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from wurst.train.accounting.callback import CarbonLedger, batch_size_of


@pytest.mark.parametrize(
    ("batch", "size"),
    [
        ({"images": torch.zeros(3, 3, 8, 8), "captions": ["a", "b", "c"]}, 3),
        ({"captions": ["a", "b"], "images": torch.zeros(5, 1)}, 2),  # captions win
        ({"latents": torch.zeros(6, 4, 2, 2)}, 6),
        ((torch.zeros(7, 2), torch.zeros(7)), 7),
        ([{"images": torch.zeros(2, 1)}], 2),
    ],
)
def test_batch_size_comes_from_captions_else_the_first_tensor(batch, size):
    assert batch_size_of(batch) == size


def test_a_batch_without_size_names_the_samples_per_step_fix():
    with pytest.raises(ValueError, match="samples_per_step"):
        batch_size_of({"names": "x"})


def test_intensity_and_region_together_are_refused():
    with pytest.raises(ValueError, match="not both"):
        CarbonLedger(carbon_intensity_kg_per_kwh=0.3, region="aws-us-east-1")


def test_a_non_positive_device_wattage_is_refused():
    with pytest.raises(ValueError, match="device_watts"):
        CarbonLedger(device_watts=0)


def test_defaults_are_the_papers_grid_and_pue():
    ledger = CarbonLedger()
    assert (ledger.carbon_intensity_kg_per_kwh, ledger.pue) == (0.37, 1.0)


class _Regression(pl.LightningModule):
    def __init__(self, samples_per_step: int | None = None, fail_at_batch: int | None = None) -> None:
        super().__init__()
        self.layer = nn.Linear(2, 1)
        self.fail_at_batch = fail_at_batch
        if samples_per_step is not None:
            self.samples_per_step = samples_per_step

    def training_step(self, batch, batch_idx):
        if batch_idx == self.fail_at_batch:
            raise RuntimeError("training failed on purpose")
        x, y = batch
        return nn.functional.mse_loss(self.layer(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(module: pl.LightningModule, callback: CarbonLedger, tmp_path, max_steps: int = 6) -> None:
    data = TensorDataset(torch.randn(40, 2), torch.randn(40, 1))
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, callbacks=[callback], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path)
    trainer.fit(module, DataLoader(data, batch_size=5))


def test_samples_follow_the_modules_samples_per_step(tmp_path):
    callback = CarbonLedger()
    _fit(_Regression(samples_per_step=96), callback, tmp_path)
    assert callback.finalize().samples == 6 * 96


def test_samples_follow_the_batches_otherwise(tmp_path):
    callback = CarbonLedger()
    _fit(_Regression(), callback, tmp_path)
    ledger = callback.finalize()
    assert (ledger.samples, ledger.steps, ledger.world_size, ledger.segments) == (30, 6, 1, 1)


def test_the_state_dict_carries_the_ledger_to_a_new_callback(tmp_path):
    callback = CarbonLedger()
    _fit(_Regression(), callback, tmp_path)
    restored = CarbonLedger()
    restored.load_state_dict(callback.state_dict())
    assert restored.finalize() == callback.finalize()


def test_provenance_holds_the_ledger_and_samples_seen(tmp_path):
    callback = CarbonLedger()
    _fit(_Regression(), callback, tmp_path)
    provenance = callback.provenance()
    assert provenance["accounting"] == callback.finalize().to_dict()
    assert provenance["samples_seen"] == 30


def test_device_watts_sets_the_energy(tmp_path):
    callback = CarbonLedger(device_watts=360.0)
    _fit(_Regression(), callback, tmp_path)
    ledger = callback.finalize()
    assert ledger.power_source == "configured"
    assert ledger.energy_kwh == pytest.approx(ledger.device_hours * 0.36, rel=1e-3)


def test_a_failed_fit_keeps_the_figures_up_to_the_failure(tmp_path):
    callback = CarbonLedger()
    with pytest.raises(RuntimeError, match="on purpose"):
        _fit(_Regression(fail_at_batch=3), callback, tmp_path)
    ledger = callback.finalize()
    assert (ledger.steps, ledger.samples, ledger.segments) == (3, 15, 1)
    assert ledger.device_hours > 0
    assert callback.state_dict()["ledger"]["samples"] == 15  # what an on-exception checkpoint would hold
