"""Hostile files: a resumable checkpoint holding a pickled callable is refused with an explanation;
a ``_target_`` inside a checkpoint's hyper-parameters is data, never instantiated on resume; an
export whose config names a class off the allow-list is refused; imported weights are read as
safetensors only. Every payload here would create a marker folder if it ever ran."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from wurst.train.export import MissingExportError, load_network, require_export

from .conftest import stage_c_argv, stage_c_dir, tiny_network_config, write_hand_off_exports

EVERY = 3


class Payload:
    """Unpickling this runs ``os.mkdir(marker)``: proof of execution, harmless otherwise."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


@pytest.fixture
def finished_run(tmp_path, launcher) -> Path:
    """A tiny Stage C run of EVERY steps (one checkpoint, step-3.ckpt); returns the output dir."""
    out = write_hand_off_exports(tmp_path / "out")
    code, output = launcher.run(stage_c_argv(out, EVERY, EVERY), tmp_path / "first.log")
    assert code == 0, output[-3000:]
    return out


@pytest.mark.slow
def test_resume_refuses_a_checkpoint_holding_pickled_code_and_says_why(finished_run, tmp_path, launcher):
    checkpoints = stage_c_dir(finished_run) / "checkpoints"
    state = torch.load(checkpoints / f"step-{EVERY:09d}.ckpt", map_location="cpu", weights_only=True)
    marker = tmp_path / "PWNED-by-checkpoint"
    state["callbacks"]["hostile"] = Payload(marker)
    hostile = checkpoints / f"step-{2 * EVERY:09d}.ckpt"  # the newest: resume=auto picks it
    torch.save(state, hostile)

    code, output = launcher.run(stage_c_argv(finished_run, 3 * EVERY, EVERY), tmp_path / "resume.log")
    assert code != 0, "a checkpoint holding pickled code was resumed from"
    assert f"refusing to load checkpoint {hostile}" in output, output[-3000:]
    assert "weights_only" in output and "could run arbitrary code" in output
    assert not marker.exists(), "the pickled payload ran"


@pytest.mark.slow
def test_a_target_in_a_checkpoints_hyper_parameters_is_data_never_instantiated(finished_run, tmp_path, launcher):
    path = stage_c_dir(finished_run) / "checkpoints" / f"step-{EVERY:09d}.ckpt"
    state = torch.load(path, map_location="cpu", weights_only=True)
    markers = [tmp_path / f"PWNED-by-hparams-{i}" for i in range(3)]
    state["hyper_parameters"]["network"] = {"_target_": "os.mkdir", "path": str(markers[0])}
    state["hyper_parameters"]["_target_"] = "os.mkdir"
    state["hyper_parameters"]["path"] = str(markers[1])
    state["WurstDataModule"]["hostile"] = {"_target_": "os.mkdir", "path": str(markers[2])}
    torch.save(state, path)  # still only strings and dicts: loads with weights_only=True

    code, output = launcher.run(stage_c_argv(finished_run, 2 * EVERY, EVERY), tmp_path / "resume.log")
    assert code == 0, output[-3000:]
    assert f"resuming from {path}" in output
    assert [m for m in markers if m.exists()] == []
    config = json.loads((stage_c_dir(finished_run) / "export" / "config.json").read_text())
    assert config["_target_"] == "wurst.models.stage_c.StageC"  # the network came from the command line's config


@pytest.mark.slow
def test_an_export_naming_a_class_off_the_allow_list_is_refused(tmp_path, launcher):
    out = write_hand_off_exports(tmp_path / "out")
    marker = tmp_path / "PWNED-by-export"
    config_path = out / "tiny" / "stage_b" / "export" / "compressor_config.json"
    config_path.write_text(json.dumps({"_target_": "os.mkdir", "path": str(marker)}))
    code, output = launcher.run(stage_c_argv(out, EVERY, EVERY), tmp_path / "run.log")
    assert code != 0
    assert "refusing to build 'os.mkdir' from an exported config" in output, output[-3000:]
    assert not marker.exists()


def tiny_stage_c_export(folder: Path) -> Path:
    from hydra.utils import instantiate

    from wurst.train.export import write_network, write_provenance

    cfg = tiny_network_config("stage_c")
    write_network(folder, "model", instantiate(cfg), cfg)
    write_provenance(folder, {"stage": "c"})
    return folder


def test_a_pickle_posing_as_safetensors_weights_is_rejected_without_running(tmp_path):
    export = tiny_stage_c_export(tmp_path / "export")
    marker = tmp_path / "PWNED-by-weights"
    torch.save({"weights": Payload(marker)}, export / "model.safetensors")
    with pytest.raises(Exception, match="(?i)header|safetensor|deserializ"):
        load_network(export)
    assert not marker.exists()


def test_an_export_holding_only_pickled_weights_is_refused(tmp_path):
    export = tiny_stage_c_export(tmp_path / "export")
    (export / "model.safetensors").rename(export / "pytorch_model.bin")
    with pytest.raises(MissingExportError, match="model.safetensors"):
        require_export(export, "c")


def test_a_hostile_pickled_compressor_backbone_file_is_refused_without_running(tmp_path):
    from omegaconf import OmegaConf

    from wurst.models.semantic_compressor import SemanticCompressor

    marker = tmp_path / "PWNED-by-backbone"
    weights = tmp_path / "backbone.pth"
    torch.save({"conv_stem.weight": Payload(marker)}, weights)
    tiny = OmegaConf.to_container(OmegaConf.load(Path(__file__).parents[2] / "conf/model/compressor/tiny.yaml"))
    with pytest.raises(Exception, match="(?i)weights.only|unpickl"):
        SemanticCompressor(**{k: v for k, v in tiny.items() if k != "_target_"} | {"pretrained": str(weights)})
    assert not marker.exists()
