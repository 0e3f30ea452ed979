"""Every paper_v2 phase composes, carries REFERENCE.md's numbers, and builds its LightningModule
(paper-size networks) on the meta device."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from wurst.train.export import write_network, write_provenance
from wurst.train.run_stage import build_module

from .conftest import compose_train

# REFERENCE.md, "Training recipe": (phase, stage, iterations, global batch, image side, compressor side)
PHASES = [
    ("stage_b_512", "b", 457_000, 512, 512, 384),
    ("stage_b_1024", "b", 300_000, 128, 1024, 768),
    ("stage_c_p1", "c", 500_000, 1536, None, 384),  # 12×12 latents
    ("stage_c_p2", "c", 364_000, 1536, None, 768),  # 24×24 latents
    ("stage_c_p3", "c", 4_000, 1536, None, 768),  # batch not published: phases 1–2's
    ("stage_c_p4", "c", 50_000, 384, None, 768),
]
EXPERIMENTS = sorted(p.stem for p in (Path(__file__).parents[2] / "conf" / "experiment" / "paper_v2").glob("*.yaml"))


def paper(phase: str, *extra: str):
    return compose_train([f"experiment=paper_v2/{phase}", "data.shards=/data/laion", *extra])


def test_every_paper_phase_file_is_covered():
    assert sorted([p for p, *_ in PHASES] + ["stage_a"]) == EXPERIMENTS


@pytest.mark.parametrize(("phase", "stage", "steps", "batch", "image", "compressor"), PHASES)
def test_phase_numbers_match_the_paper(phase, stage, steps, batch, image, compressor):
    cfg = paper(phase)
    assert cfg.stage.name == stage
    assert cfg.trainer.max_steps == steps
    assert cfg.data.global_batch_size == batch
    assert cfg.stage.data.image_size == image
    assert cfg.stage.data.compressor_size == compressor
    if stage == "c":
        assert cfg.stage.data.compressor_size // 32 in (12, 24)  # the 42:1 latents of REFERENCE.md


@pytest.mark.parametrize("phase", EXPERIMENTS)
def test_shared_recipe_numbers_match_the_paper(phase):
    cfg = paper(phase)
    assert cfg.optim.name == "adamw" and cfg.optim.lr == 1e-4 and cfg.optim.warmup_steps == 10_000
    assert cfg.optim.grad_clip == 1.0
    assert (cfg.ema.start, cfg.ema.every, cfg.ema.beta) == (5000, 100, 0.9)
    assert cfg.trainer.precision in ("bf16-mixed", "32-true")  # bf16 on GPU, fp32 on CPU
    f = cfg.data.filter
    assert (f.min_original_size, f.max_original_size, f.max_pwatermark, f.max_punsafe) == (512, 4096, 0.5, 0.99)
    assert f.min_aesthetic == (6.0 if phase == "stage_c_p4" else 5.0)
    d = cfg.diffusion
    assert (d.schedule.s, d.training_t.scale, d.training_t.eps, d.p2.k, d.p2.gamma) == (0.008, 1.08, 0.001, 1.0, 1.0)
    assert (d.text_dropout, d.effnet_zero_prob, d.effnet_noise_prob, d.effnet_noise_t_max) == (0.05, 0.05, 0.3, 0.5)
    assert (d.latent_mean, d.latent_std) == (42.0, 1.0)


def test_later_phases_start_from_the_previous_export():
    assert paper("stage_b_1024").init_from.path.endswith("paper_v2/stage_b_512/export")
    assert paper("stage_c_p2").init_from.path.endswith("paper_v2/stage_c_p1/export")
    assert paper("stage_c_p3").init_from.path.endswith("paper_v2/stage_c_p2/export")
    assert paper("stage_c_p4").init_from.path.endswith("paper_v2/stage_c_p3/export")
    assert paper("stage_c_p4").phase == "stage_c" and paper("stage_b_1024").phase == "stage_b"
    assert paper("stage_c_p3").data.buckets.aspect_ratios  # mixed aspect ratios


@pytest.mark.slow
@pytest.mark.parametrize(("phase", "network_params"), [("stage_b_512", 1_055.4e6), ("stage_c_p1", 993.6e6)])
def test_paper_modules_build_on_the_meta_device(tmp_path, phase, network_params):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    root = tmp_path / "paper_v2"
    base = paper(phase, f"paths.output_dir={tmp_path}", "model.compressor.pretrained=false",
                 "model.text_encoder_b.pretrained=null", "model.text_encoder_c.pretrained=null")
    # The hand-off artifacts a paper phase reads, at paper size (Stage A; Stage B's compressor).
    for name, key, export in (("model", "stage_a", "stage_a"), ("compressor", "compressor", "stage_b")):
        net_cfg = OmegaConf.to_container(base.model[key], resolve=True)
        write_network(root / export / "export", name, instantiate(net_cfg), net_cfg)
        write_provenance(root / export / "export", {"stage": export[-1]})
    module = build_module(base, device="meta")
    assert module.network.projection.weight.is_meta if phase.startswith("stage_c") else module.network.embedding[1].weight.is_meta
    params = sum(p.numel() for p in module.network.parameters())
    print(f"{phase}: {params / 1e6:,.1f} M network parameters")
    assert abs(params - network_params) / network_params < 0.005
    assert torch.device("meta") == next(module.network.parameters()).device
