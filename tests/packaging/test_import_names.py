"""The installed import names are ``wurst.*`` and never clash with a user's own top-level folders.

ML project folders usually hold ``data/``, ``models/`` and ``train/`` directories of their own. Run from
such a folder, ``python -m wurst.train`` must import wurst's packages, not the user's (and, installed,
wurst must not put top-level ``data``/``models``/``train``/``eval``/``slurm`` packages into site-packages,
where they would shadow or be shadowed by the user's).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from wurst.models.hub.pipeline_dir import read_network
from wurst.train.config import CONFIG_DIR
from wurst.train.export import load_network, write_network

REPO = Path(CONFIG_DIR).parent
BIN = Path(sys.executable).parent
USER_PACKAGES = ("data", "models", "train", "eval", "slurm")


def _user_project(root: Path) -> Path:
    """A folder like a user's ML project: its own data/, models/, train/, eval/, slurm/ packages, each of
    which fails loudly if anything imports it."""
    for name in USER_PACKAGES:
        (root / name).mkdir(parents=True)
        (root / name / "__init__.py").write_text(
            f"raise ImportError('the user\\'s own {name}/ package was imported instead of wurst.{name}')\n"
        )
    return root


def _run(argv: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "PYTHONPATH": ""}
    return subprocess.run(argv, check=False, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_no_top_level_data_models_train_eval_or_slurm_package_is_installed(tmp_path):
    probe = (
        "import importlib.util, json\n"
        f"names = {list(USER_PACKAGES)!r}\n"
        "found = {n: getattr(importlib.util.find_spec(n), 'origin', None) for n in names}\n"
        "ours = {n: importlib.util.find_spec('wurst.' + n).submodule_search_locations[0] for n in names}\n"
        "print(json.dumps({'found': found, 'ours': ours}))\n"
    )
    done = _run([sys.executable, "-c", probe], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["found"] == {n: None for n in USER_PACKAGES}, f"top-level packages installed: {result['found']}"
    assert result["ours"] == {n: str(REPO / n) for n in USER_PACKAGES}


@pytest.mark.parametrize(
    "argv",
    [
        ["-m", "wurst.train", "--cfg", "job", "stage=c", "experiment=tiny"],
        ["-m", "wurst.eval", "--cfg", "job"],
        ["-m", "wurst.slurm", "--help"],
        ["-m", "wurst.train.prompt_fidelity", "--help"],
    ],
    ids=["train", "eval", "slurm", "prompt_fidelity"],
)
def test_python_dash_m_commands_start_from_a_folder_with_the_users_own_packages(tmp_path, argv):
    done = _run([sys.executable, *argv], cwd=_user_project(tmp_path / "project"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "was imported instead of" not in done.stderr


@pytest.mark.parametrize("script", ["wurst-data", "wurst-export", "wurst-generate", "wurst-carbon"])
def test_console_scripts_start_from_a_folder_with_the_users_own_packages(tmp_path, script):
    done = _run([str(BIN / script), "--help"], cwd=_user_project(tmp_path / "project"))
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow
def test_a_stage_trains_and_exports_from_a_folder_with_the_users_own_packages(tmp_path):
    project = _user_project(tmp_path / "project")
    done = _run(
        [sys.executable, "-m", "wurst.train", "stage=a", "experiment=tiny", "trainer.max_steps=2",
         "data.num_workers=0", "logger=csv", f"paths.output_dir={tmp_path / 'out'}"],
        cwd=project,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    config = json.loads((tmp_path / "out" / "tiny" / "stage_a" / "export" / "config.json").read_text())
    assert config["_target_"] == "wurst.models.stage_a.StageA"


@pytest.mark.parametrize("loader", [load_network, read_network], ids=["train.export", "hub.pipeline_dir"])
def test_an_export_written_before_the_rename_still_loads(tmp_path, loader):
    """Exports made before the packages moved under ``wurst.`` name their class ``models.stage_c.StageC``."""
    cfg = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "model" / "stage_c" / "tiny.yaml"), resolve=True)
    torch.manual_seed(0)
    network = instantiate(cfg)
    write_network(tmp_path, "model", network, cfg)
    old = {**cfg, "_target_": "models.stage_c.StageC"}
    (tmp_path / "config.json").write_text(json.dumps(old))
    loaded = loader(tmp_path) if loader is load_network else loader(tmp_path, "model")
    assert type(loaded) is type(network)
    for key, value in network.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_a_text_encoder_exported_before_padding_was_configurable_pads_with_zero_as_it_trained(tmp_path):
    """Its config has no pad_token_id: it was trained on open_clip's 0-padding, and is read that way."""
    from wurst.models.hub.pipeline_dir import read_text_encoder

    cfg = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "model" / "text_encoder" / "tiny.yaml"), resolve=True)
    torch.manual_seed(0)
    encoder = instantiate(cfg)
    write_network(tmp_path, "text_encoder", encoder, cfg)
    old = {k: v for k, v in cfg.items() if k != "pad_token_id"}
    (tmp_path / "text_encoder_config.json").write_text(json.dumps({**old, "_target_": "models.text_encoder.TextEncoder"}))
    loaded = read_text_encoder(tmp_path)
    assert loaded.pad_token_id == 0 and encoder.pad_token_id == 49407
    assert (loaded.tokenize([""])[0, 2:] == 0).all()
