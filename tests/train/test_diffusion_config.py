"""conf/diffusion is what training, the export, the importer and the sampler use: one number, read once.

A run with ``diffusion.schedule.s=0.02`` must noise its training batches with s = 0.02, publish 0.02 in the
diffusers scheduler config, and our importer and sampler must read 0.02 back (before, training used a
constant 0.008 while the export published the config's value, and the importer then refused the folder).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from wurst.models.diffusion import DiffusionSettings, add_noise, cosine_alpha_cumprod, diffusion_loss
from wurst.models.hub.diffusers_export import export_pipeline
from wurst.models.hub.diffusers_import import import_diffusers
from wurst.models.hub.pipeline_dir import read_provenance, write_json
from wurst.train.cascade_loading import load_cascade
from wurst.train.run_stage import build_module

from .conftest import REPO, compose_train, write_tiny_export

S = 0.02


def test_the_training_step_noises_and_weights_with_the_configured_schedule(tiny_pipeline_dir):
    cfg = compose_train(["stage=c", "experiment=tiny", f"diffusion.schedule.s={S}", "diffusion.p2.k=2.0",
                         f"paths.output_dir={tiny_pipeline_dir.parent}"])
    module = build_module(cfg)
    assert module.diffusion == DiffusionSettings(s=S, p2_k=2.0)
    x0, noise, t = torch.randn(4, 16, 3, 3), torch.randn(4, 16, 3, 3), torch.tensor([0.1, 0.4, 0.7, 0.9])
    assert torch.equal(module.diffusion.add_noise(x0, t, noise), add_noise(x0, t, noise, s=S))
    assert not torch.allclose(module.diffusion.add_noise(x0, t, noise), add_noise(x0, t, noise))
    eps = torch.randn_like(x0)
    assert torch.equal(module.diffusion.loss(eps, noise, t)[0], diffusion_loss(eps, noise, t, k=2.0, s=S)[0])
    assert not torch.equal(cosine_alpha_cumprod(t, S), cosine_alpha_cumprod(t))


def test_an_unknown_schedule_is_refused_before_training():
    with pytest.raises(ValueError, match="only the cosine schedule"):
        DiffusionSettings.from_config({"schedule": {"name": "linear"}})


@pytest.mark.slow
def test_a_stage_trained_with_s_002_is_exported_imported_and_sampled_with_s_002(tmp_path):
    root = tmp_path / "tiny"
    write_tiny_export(root / "stage_a" / "export", "a")
    write_tiny_export(root / "stage_b" / "export", "b")
    done = subprocess.run(
        [sys.executable, "-m", "wurst.train", "stage=c", "experiment=tiny", "trainer.max_steps=2",
         "data.num_workers=0", "sample_every=0", f"diffusion.schedule.s={S}", f"paths.output_dir={tmp_path}"],
        cwd=REPO, capture_output=True, text=True, timeout=600, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    provenance = read_provenance(root / "stage_c" / "export")
    assert provenance["config"]["diffusion"]["schedule"]["s"] == S
    assert load_cascade(root, sampler="tiny").prior_schedule_s == S  # our sampler

    # The stage B export of this fixture records no training config: give it one, as training writes it.
    b_provenance = read_provenance(root / "stage_b" / "export")
    write_json(root / "stage_b" / "export" / "provenance.json",
               {**b_provenance, "config": {"diffusion": {"schedule": {"name": "cosine", "s": 0.008}}}})
    exported = export_pipeline(root, tmp_path / "hub")
    assert json.loads((exported / "prior_scheduler" / "scheduler_config.json").read_text())["s"] == S
    assert json.loads((exported / "scheduler" / "scheduler_config.json").read_text())["s"] == 0.008

    imported = import_diffusers(exported, tmp_path / "imported")  # refused before: s != 0.008
    assert read_provenance(imported / "stage_c" / "export")["config"]["diffusion"]["schedule"]["s"] == S
    cascade = load_cascade(imported, sampler="tiny")
    assert (cascade.prior_schedule_s, cascade.decoder_schedule_s) == (S, 0.008)


def test_the_paper_diffusion_config_holds_reference_md_s_numbers():
    from omegaconf import OmegaConf

    settings = DiffusionSettings.from_config(OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "diffusion" / "paper.yaml")))
    # REFERENCE.md "Diffusion, as the official code does it".
    assert settings == DiffusionSettings(s=0.008, clamp=(1e-4, 0.9999), t_stretch=1.08, t_min=0.001, p2_k=1.0, p2_gamma=1.0)
