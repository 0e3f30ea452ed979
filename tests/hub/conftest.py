"""Fixtures for the Hub export/import tests: a tiny pipeline directory as `wurst-train` lays it out.

Networks come from conf/model/*/tiny.yaml with seeded random weights (every parameter replaced with
noise: the authors' initialisation zeroes Stage C's head and diffusers-style output layers, which would
make the cascade ignore its inputs and every comparison vacuous). The layout and the provenance fields
are those of train/run_stage.py ``export_stage``; nothing here imports ``train``.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from wurst.models.hub.pipeline_dir import write_json, write_network

CONF = Path(__file__).resolve().parents[2] / "conf"
IMAGE_SIDE = 128  # tiny cascade: Stage C latent 16×3×3, Stage B latent 4×32×32
PROMPT = "a red circle on a blue background"


def tiny_config(group: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(CONF / "model" / group / "tiny.yaml"), resolve=True)


def randomise(module: nn.Module, seed: int, std: float) -> nn.Module:
    """Seeded noise in every parameter: vectors ~ N(0, std²), matrices ~ N(0, min(std, fan_in^-½)²)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            fan_in = parameter[0].numel() if parameter.ndim >= 2 else 1
            scale = std if parameter.ndim < 2 else min(std, fan_in**-0.5)
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
    return module.eval()


def build_tiny(group: str, seed: int, std: float | None) -> tuple[nn.Module, dict]:
    config = tiny_config(group)
    torch.manual_seed(seed)
    module = instantiate(config)
    if std is not None:
        randomise(module, seed, std)
    return module, config


def provenance(stage: str, phase: str, steps: int, samples: int, params: int) -> dict:
    """A provenance.json as train/run_stage.py writes it (a trimmed resolved config, a carbon ledger)."""
    hours = {"a": 0.5, "b": 1.25, "c": 2.0}[stage]
    return {
        "stage": stage,
        "phase": phase,
        "group": "tiny",
        "git_revision": "0123456789abcdef0123456789abcdef01234567",
        "steps": steps,
        "params": params,
        "samples_seen": samples,
        "metrics": {"train/loss": 0.5},
        "dataset": {"shards": 8, "shard_list_hash": "cafef00d", "counts": {"seen": samples}},
        "accounting": {
            "device_hours": hours,
            "wall_hours": hours,
            "energy_kwh": hours * 0.25,
            "co2_kg": hours * 0.25 * 0.37,
            "samples": samples,
            "steps": steps,
            "pue": 1.0,
            "carbon_intensity_kg_per_kwh": 0.37,
            "device_name": "cpu",
            "power_source": "fallback",
            "world_size": 1,
            "segments": 1,
            "per_rank": None,
        },
        "config": {
            "stage": {
                "name": stage,
                "data": {"image_size": None if stage == "c" else 128, "compressor_size": 96},
            },
            "data": {
                "shards": "/home/someone/private/data/synthetic/{00000..00007}.tar",
                "global_batch_size": 8,
                "resolution": 128,
                "compressor_resolution": 96,
                "filter": {
                    "_target_": "wurst.data.laion_filter.LAIONFilter",
                    "min_aesthetic": 5.0,
                    "max_pwatermark": 0.5,
                },
            },
            "optim": {
                "name": "adamw",
                "lr": 1.0e-4,
                "warmup_steps": 10,
                "weight_decay": 0.01,
                "grad_clip": 1.0,
            },
            "ema": {"enabled": True, "start": 5000, "every": 100, "beta": 0.9},
            "trainer": {"max_steps": steps, "precision": "32-true"},
            "diffusion": {
                "schedule": {"name": "cosine", "s": 0.008, "clamp": [1.0e-4, 0.9999]},
                "latent_mean": 42.0,
                "latent_std": 1.0,
            },
        },
    }


def write_tiny_pipeline(root: Path) -> Path:
    """outputs/<group>/ with random tiny Stage A, B (+ compressor, text encoder) and C (+ text encoder) exports."""
    # Noise levels keep z, Stage B latents and pixels in a sane range (few pixels clamp to 0 or 1).
    stage_a, cfg_a = build_tiny("stage_a", seed=3, std=0.05)
    with torch.no_grad():
        stage_a.out_block[0].bias.fill_(0.5)  # centre the pixels in [0, 1]
    stage_b, cfg_b = build_tiny("stage_b", seed=2, std=0.02)
    stage_c, cfg_c = build_tiny("stage_c", seed=1, std=0.02)
    compressor, cfg_compressor = build_tiny("compressor", seed=4, std=None)
    text_b, cfg_text = build_tiny("text_encoder", seed=5, std=None)  # open_clip's own random init
    text_c, _ = build_tiny("text_encoder", seed=6, std=None)

    exports = {
        "a": root / "stage_a" / "export",
        "b": root / "stage_b" / "export",
        "c": root / "stage_c" / "export",
    }
    write_network(exports["a"], "model", stage_a.state_dict(), cfg_a)
    write_network(exports["b"], "model", stage_b.state_dict(), cfg_b)
    write_network(exports["b"], "compressor", compressor.state_dict(), cfg_compressor)
    write_network(exports["b"], "text_encoder", text_b.state_dict(), cfg_text)
    write_network(exports["c"], "model", stage_c.state_dict(), cfg_c)
    write_network(exports["c"], "text_encoder", text_c.state_dict(), cfg_text)
    write_json(
        exports["c"] / "hand_off.json", {"latent_mean": 42.0, "latent_std": 1.0}
    )  # the public v2 hand-off
    counts = {"a": stage_a, "b": stage_b, "c": stage_c}
    for stage, (phase, steps, samples) in {
        "a": ("stage_a", 40, 320),
        "b": ("stage_b", 60, 480),
        "c": ("stage_c", 80, 640),
    }.items():
        params = sum(p.numel() for p in counts[stage].parameters())
        write_json(exports[stage] / "provenance.json", provenance(stage, phase, steps, samples, params))
    write_json(
        root / "pipeline.json", {"pipeline": "tiny", "stages": {s: str(root / f"stage_{s}") for s in "abc"}}
    )
    return root


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory) -> Path:
    """A complete tiny pipeline directory; read-only for tests (copy it with ``copy_pipeline`` to change it)."""
    return write_tiny_pipeline(tmp_path_factory.mktemp("pipelines") / "tiny")


@pytest.fixture
def copy_pipeline(tiny_pipeline_dir, tmp_path):
    """A private copy of the tiny pipeline directory that a test may break."""

    def copy(name: str = "tiny") -> Path:
        return Path(shutil.copytree(tiny_pipeline_dir, tmp_path / name))

    return copy


@pytest.fixture(scope="session")
def exported_folder(tiny_pipeline_dir, tmp_path_factory) -> Path:
    """The tiny pipeline exported to the diffusers layout (read-only)."""
    from wurst.models.hub.diffusers_export import export_pipeline

    return export_pipeline(
        tiny_pipeline_dir, tmp_path_factory.mktemp("hub") / "wurst-tiny", repo_id="someone/wurst-tiny"
    )


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def dump(obj) -> str:
    return json.dumps(obj, indent=2, default=str)


def _fake_hub_module():
    # tests/ is not a package (pytest --import-mode=importlib): load the helper by path.
    spec = importlib.util.spec_from_file_location(
        "wurst_tests_hub_fake_hub", Path(__file__).with_name("fake_hub.py")
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def fake_hub():
    """A loopback Hub API on 127.0.0.1 recording requests (tests/hub/fake_hub.py); ``.url`` is its endpoint."""
    module = _fake_hub_module()
    hub = module.FakeHub()
    server, thread = module.serve(hub)
    yield hub
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)
