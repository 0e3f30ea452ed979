"""Specifications of the small training pieces: batch arithmetic, EMA, warm-up, exports."""

import json

import pytest
import torch
from torch import nn

from wurst.data.datamodule import per_device_batch_size
from wurst.train.ema import EMA
from wurst.train.export import (
    MissingExportError,
    build_from_config,
    load_network,
    require_export,
    write_network,
)
from wurst.train.recipe import build_optimizer, linear_warmup


def test_per_device_batch_divides_global_batch_by_world_and_accumulation():
    assert per_device_batch_size(1536, 64, 1) == 24
    assert per_device_batch_size(512, 8, 4) == 16


def test_indivisible_global_batch_is_an_error_naming_the_fix():
    with pytest.raises(ValueError, match=r"global_batch_size=100 is not divisible by world size 8 x accumulate_grad_batches 1"):
        per_device_batch_size(100, 8, 1)


def test_ema_copies_before_start_and_blends_after():
    model = nn.Linear(2, 2)
    ema = EMA(model, start=10, every=5, beta=0.9)
    with torch.no_grad():
        model.weight.fill_(1.0)
    assert not ema.update(model, 3)  # not an update step
    assert ema.update(model, 5)  # before start: β = 0, a copy
    assert torch.allclose(ema.shadow.weight, torch.ones(2, 2))
    with torch.no_grad():
        model.weight.fill_(2.0)
    ema.update(model, 15)  # after start: 0.9·1 + 0.1·2
    assert torch.allclose(ema.shadow.weight, torch.full((2, 2), 1.1))


def test_linear_warmup_reaches_full_lr_at_the_last_warmup_step():
    opt = build_optimizer([{"params": [nn.Parameter(torch.zeros(1))]}], {"lr": 1e-3})
    sched = linear_warmup(opt, 4)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])


def test_unknown_optimizer_name_is_rejected():
    with pytest.raises(ValueError, match="optim.name='sgd'"):
        build_optimizer([{"params": [nn.Parameter(torch.zeros(1))]}], {"lr": 1e-3, "name": "sgd"})


def test_missing_export_error_names_the_file_and_the_command(tmp_path):
    with pytest.raises(MissingExportError) as err:
        require_export(tmp_path / "stage_a" / "export", "a")
    message = str(err.value)
    assert str(tmp_path / "stage_a" / "export" / "model.safetensors") in message
    assert "wurst-train stage=a experiment=tiny" in message


def test_exported_config_cannot_name_an_arbitrary_class(tmp_path):
    with pytest.raises(ValueError, match="refusing to build _target_='os.system'"):
        build_from_config({"_target_": "os.system", "command": "true"})


def test_export_round_trips_a_network(tmp_path):
    from wurst.models.stage_c import StageC

    cfg = {"_target_": "wurst.models.stage_c.StageC", "c_in": 4, "c": 16, "c_cond": 8, "c_r": 8, "depth": 1, "nhead": 2}
    net = build_from_config(cfg)
    write_network(tmp_path, "model", net, cfg)
    (tmp_path / "provenance.json").write_text(json.dumps({"stage": "c"}))
    again = load_network(tmp_path)
    assert isinstance(again, StageC)
    for a, b in zip(net.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary files left behind
