"""Training-step throughput (issue 10): our Lightning step against the official-style loop on diffusers'
networks, in one run on one device.

    python benchmarks/bench_train_step.py --config tiny|paper --stage c|b --latent 12|24 \\
        --from images|cache|both --device cpu|cuda --steps N [--batch B] [--compile] \\
        [--gradient-checkpointing] [--channels-last] [--optim adamw|adamw8bit] [--json PATH]

Ours: the real ``StageCModule`` / ``StageBModule`` built from the Hydra configs the training uses
(``experiment=paper_v2/<phase>`` or ``experiment=tiny``), driven by a real Lightning Trainer
(``max_steps``, no logger, no checkpoints, no progress bar) with the configs' precision (bf16-mixed on
a GPU, fp32 on CPU), gradient clipping and AdamW (fused on a GPU); optionally ``torch.compile``,
gradient checkpointing, channels-last. "images": the frozen encoders run every step; "cache": Stage C
reads precomputed compressor latents and text states (``wurst-data cache``), no encoders.
Reference: ``benchmarks/reference_loop.py`` (diffusers' WuerstchenPrior / WuerstchenDiffNeXt, plain
loop in the authors' style), by default from images.

Both see the same batch, pinned once and replayed (data loading is off the critical path here;
``bench_data_pipeline.py`` measures the loader), and the same network input shapes. After ``--warmup``
untimed steps, ``--steps`` steps are timed end to end (median reported). Per run: samples/s, median
step time, peak memory (CUDA: max_memory_allocated; CPU: peak RSS), model FLOPs utilisation from the
counted forward + backward FLOPs of the network (n/a on CPU), and host syncs in one step with their
call sites. Networks are randomly initialised from the configs (throughput does not depend on the
weights; nothing is downloaded). Ends with the projected device-hours of the paper_v2 recipe of the
stage at the measured throughput (train/accounting/projection.py). Prints a markdown table, writes JSON.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import logging
import math
import random
import statistics
import sys
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: the repository's packages sit beside benchmarks/
    sys.path.insert(0, str(REPO))

import lightning as L
from omegaconf import DictConfig

from benchmarks.model_flops import count_on_meta, model_flops_utilisation, peak_flops_per_s
from benchmarks.reference_loop import OfficialStyleLoop, diffusers_network
from benchmarks.step_meters import HostSyncCounter, PeakMemory, StepClock, release_memory, summarise_steps
from wurst.data.datamodule import per_device_batch_size
from wurst.train.config import CONFIG_DIR  # also registers the configs' resolvers
from wurst.train.export import load_network, write_network, write_provenance
from wurst.train.networks import instantiate_network, network_config
from wurst.train.run_stage import build_module, plain

# paper_v2 phase of each (stage, compressor latent side): REFERENCE.md recipe (Stage C 12×12 then 24×24;
# Stage B at 512 px with the compressor at 384 → 12×12, then 1024 / 768 → 24×24).
PAPER_PHASES = {("c", 12): "stage_c_p1", ("c", 24): "stage_c_p2", ("b", 12): "stage_b_512", ("b", 24): "stage_b_1024"}
# Per-GPU batch of the sizing: a 64-GPU run (Stage C: 1536 / 64 = 24).
PAPER_WORLD_SIZE = 64
# The semantic compressor's stride (EfficientNetV2 features): latent side = compressor image side / 32.
COMPRESSOR_STRIDE = 32
TEXT_TOKENS = 77
# Table 2 / the v2 model card: what the paper's recipe cost per stage.
PAPER_HOURS = {"c": "24,602 A100 hours", "b": "~11,000 A100 hours"}
_CAPTION_WORDS = (
    "a", "photograph", "of", "red", "vintage", "car", "parked", "on", "cobblestone", "street", "at",
    "sunset", "highly", "detailed", "oil", "painting", "portrait", "young", "woman", "wearing", "blue",
    "hat", "in", "the", "style", "of", "impressionism", "mountain", "lake", "reflection", "morning", "fog",
    "digital", "art", "cozy", "kitchen", "with", "wooden", "table", "and", "fresh", "bread", "golden",
    "retriever", "playing", "snow",
)


# ---------------------------------------------------------------------------------------------- setup
def compose_config(config: str, stage: str, latent: int | None, work_dir: Path, args: argparse.Namespace) -> DictConfig:
    """The training config of this stage as ``wurst-train`` composes it, with random-init encoders."""
    from hydra import compose, initialize_config_dir

    if config == "paper":
        phase = PAPER_PHASES.get((stage, latent), PAPER_PHASES[(stage, 12)])
        overrides = [f"experiment=paper_v2/{phase}"]
    else:
        overrides = [f"stage={stage}", "experiment=tiny"]
    text_encoder = f"model.text_encoder_{stage}"
    overrides += [
        f"pipeline_dir={work_dir}",
        "resume=null",
        f"seed={args.seed}",
        f"gradient_checkpointing={str(bool(args.gradient_checkpointing)).lower()}",
        # Random weights: throughput does not depend on them, and nothing may be downloaded here.
        f"{text_encoder}.pretrained=null",
        "model.compressor.pretrained=false",
    ]
    if args.optim:
        overrides.append(f"optim={args.optim}")
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def stage_sizes(cfg: DictConfig, stage: str, latent: int | None) -> dict[str, int]:
    """Compressor image side, Stage B image side and the compressor latent side for this run."""
    data = cfg.stage.data
    default_compressor = int(data.compressor_size)
    latent = default_compressor // COMPRESSOR_STRIDE if latent is None else int(latent)
    if latent < 1:
        raise ValueError(f"--latent {latent}: the compressor latent side must be a positive integer (12 or 24)")
    sizes = {"latent": latent, "compressor_size": latent * COMPRESSOR_STRIDE}
    if stage == "b":
        # Keep the config's image : compressor ratio (512 : 384, 1024 : 768, 128 : 96).
        image_size, remainder = divmod(int(data.image_size) * sizes["compressor_size"], default_compressor)
        if remainder:
            raise ValueError(
                f"--latent {latent}: Stage B's image side would be {int(data.image_size)}·{sizes['compressor_size']}"
                f"/{default_compressor}, not an integer; pick a latent side that keeps the "
                f"{int(data.image_size)}:{default_compressor} ratio (multiples of 3: 3, 12, 24)"
            )
        sizes["image_size"] = image_size
    return sizes


def per_device_batch(cfg: DictConfig, args: argparse.Namespace) -> int:
    if args.batch is not None:
        if args.batch < 1:
            raise ValueError(f"--batch {args.batch}: the per-device batch must be a positive integer")
        return int(args.batch)
    world = args.world_size or (PAPER_WORLD_SIZE if args.config == "paper" else 1)
    global_batch = cfg.data.get("global_batch_size")
    if global_batch is None:
        raise ValueError(
            f"the {args.config} config of Stage {args.stage.upper()} gives no data.global_batch_size; pass "
            "--batch (per device)"
        )
    return per_device_batch_size(int(global_batch), int(world), 1)


def write_hand_off_exports(cfg: DictConfig, stage: str) -> None:
    """Random-init exports of what the stage loads: Stage A for B, the compressor for C."""
    module = cfg.stage.module
    if stage == "b":
        config = network_config(plain(cfg.model.stage_a))
        write_network(module.stage_a_export, "model", instantiate_network(config), config)
        write_provenance(module.stage_a_export, {"stage": "a", "made_by": "benchmarks/bench_train_step.py"})
    else:
        config = network_config(plain(cfg.model.compressor))
        write_network(module.compressor_export, "compressor", instantiate_network(config), config)
        write_provenance(module.compressor_export, {"stage": "b", "made_by": "benchmarks/bench_train_step.py"})


def synthetic_captions(count: int, seed: int) -> list[str]:
    """LAION-like captions of 8 to 30 words (tokenising them is part of a step that encodes text)."""
    rng = random.Random(seed)
    return [" ".join(rng.choices(_CAPTION_WORDS, k=rng.randint(8, 30))) for _ in range(count)]


def make_batch(stage: str, source: str, batch_size: int, sizes: Mapping[str, int], c_latent: int,
               text_width: int, seed: int) -> dict[str, Any]:
    """One batch as the data module yields it (float images in [0, 1]; the cache's fp16 arrays).

    Stage C from images: ``images [B, 3, s, s]`` at the compressor's side s; Stage B: ``images
    [B, 3, S, S]`` and ``compressor_images [B, 3, s, s]``; from cache: ``compressor_latents
    [B, 16, s/32, s/32]`` and ``text_hidden [B, 77, D]``. Every batch has ``captions`` (B strings).
    """
    g = torch.Generator().manual_seed(seed)
    s, side = sizes["compressor_size"], sizes["latent"]
    batch: dict[str, Any] = {"captions": synthetic_captions(batch_size, seed)}
    if source == "cache":
        batch["compressor_latents"] = torch.randn(batch_size, c_latent, side, side, generator=g).half()
        batch["text_hidden"] = torch.randn(batch_size, TEXT_TOKENS, text_width, generator=g).half()
    elif stage == "c":
        batch["images"] = torch.rand(batch_size, 3, s, s, generator=g)
    else:
        S = sizes["image_size"]
        batch["images"] = torch.rand(batch_size, 3, S, S, generator=g)
        batch["compressor_images"] = torch.rand(batch_size, 3, s, s, generator=g)
    return batch


class RepeatedBatch(torch.utils.data.IterableDataset):
    """Yields the same (pinned, on CUDA) batch forever: an ideal loader, so only the step is timed."""

    def __init__(self, batch: Mapping[str, Any], pin: bool):
        super().__init__()
        self.batch = {k: v.pin_memory() if pin and torch.is_tensor(v) else v for k, v in batch.items()}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            yield self.batch


def batch_loader(batch: Mapping[str, Any], device: torch.device) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(RepeatedBatch(batch, pin=device.type == "cuda"), batch_size=None)


# ---------------------------------------------------------------------------------------------- measuring
class NetworkInputs:
    """Records the shapes of the tensors the network's first forward receives, by argument name."""

    def __init__(self, network: torch.nn.Module):
        target = getattr(network, "_orig_mod", network)
        self.signature = inspect.signature(target.forward)
        self.shapes: dict[str, list[int] | None] = {}
        self.handle = network.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs):
        bound = self.signature.bind_partial(*args, **kwargs).arguments
        self.shapes = {k: (list(v.shape) if torch.is_tensor(v) else None) for k, v in bound.items()
                       if torch.is_tensor(v) or v is None}
        self.handle.remove()


class StepMeter(L.Callback):
    """Marks each step's end on the clock; counts host syncs from the start of step ``count_at`` to the
    start of the next one (so Lightning's own per-step work after ``on_train_batch_end`` is included).
    The reference loop calls the same hooks by hand."""

    def __init__(self, clock: StepClock, count_at: int | None, device_type: str | None):
        self.clock, self.count_at, self.device_type = clock, count_at, device_type
        self.counter: HostSyncCounter | None = None
        self.result: HostSyncCounter | None = None

    def _stop(self) -> None:
        if self.counter is not None:
            self.counter.__exit__(None, None, None)
            self.result, self.counter = self.counter, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._stop()
        if self.count_at is not None and batch_idx == self.count_at:
            self.counter = HostSyncCounter(self.device_type)
            self.counter.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.clock.mark()

    def on_train_end(self, trainer, pl_module) -> None:
        self._stop()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._stop()  # never leave the dispatch mode on after a failed run (out of memory)


def sync_report(counter: HostSyncCounter | None) -> dict[str, Any]:
    if counter is None:
        return {"host_syncs": None, "host_sync_sites": {}}
    return {"host_syncs": counter.count, "host_sync_sites": dict(counter.sites.most_common(12))}


def describe_optimizer(optimizer: torch.optim.Optimizer) -> str:
    return (f"{type(optimizer).__name__}(fused={optimizer.defaults.get('fused')}, "
            f"foreach={optimizer.defaults.get('foreach')})")


def count_step(args: argparse.Namespace) -> int | None:
    """Which (0-based) step the host syncs are counted in: the second-to-last warm-up step, untimed,
    whose counting window ends at the start of the last warm-up step. None when compiled (the
    dispatch mode would change what the compiler sees) or with fewer than 2 warm-up steps."""
    return None if args.compile or args.warmup < 2 else args.warmup - 2


def run_ours(cfg: DictConfig, source: str, batch: Mapping[str, Any], device: torch.device,
             args: argparse.Namespace) -> dict[str, Any]:
    """Our LightningModule's training step in a real Lightning Trainer."""
    cfg = copy.deepcopy(cfg)
    if source == "cache" and args.stage == "c":
        cfg.stage.module.compressor_export = None  # a cached run never loads the compressor
    module = build_module(cfg)
    if args.channels_last:
        module.network = module.network.to(memory_format=torch.channels_last)
    if args.compile:
        module.network = torch.compile(module.network)
    inputs = NetworkInputs(module.network)
    clock = StepClock(device)
    meter = StepMeter(clock, count_step(args), "cuda" if device.type == "cuda" else None)
    callbacks: list[L.Callback] = [meter]
    if args.callbacks:  # what every stage run adds: progress bar, carbon ledger, previews (off)
        from wurst.train.callbacks import build_callbacks

        callbacks += build_callbacks(cfg, Path(cfg.pipeline_dir) / "callbacks")
    trainer_kwargs = plain(cfg.trainer)
    trainer_kwargs.pop("_target_", None)
    trainer_kwargs.update(
        accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, num_nodes=1, strategy="auto",
        precision=args.precision, max_steps=args.warmup + args.steps, max_epochs=-1,
        accumulate_grad_batches=1, logger=False, enable_checkpointing=False, enable_progress_bar=args.callbacks,
        enable_model_summary=False, callbacks=callbacks, default_root_dir=str(Path(cfg.pipeline_dir) / "lightning"),
        limit_val_batches=0, num_sanity_val_steps=0,
    )
    trainer = L.Trainer(**trainer_kwargs)
    memory = PeakMemory(device)
    memory.reset()
    trainer.fit(module, train_dataloaders=batch_loader(batch, device))
    peak = memory.read()
    optimizer = trainer.optimizers[0]
    result = {
        "run": f"ours ({source})", "impl": "ours", "source": source,
        "network": type(getattr(module.network, "_orig_mod", module.network)).__name__,
        "batch": len(batch["captions"]),
        "step_seconds": clock.step_seconds(skip=args.warmup), "step_cpu_seconds": clock.cpu_seconds(skip=args.warmup),
        "peak_memory_bytes": peak, "memory_kind": memory.kind, "memory_baseline_bytes": memory.baseline,
        "precision": str(trainer.precision), "compile": bool(args.compile),
        "gradient_checkpointing": bool(getattr(getattr(module.network, "_orig_mod", module.network),
                                               "gradient_checkpointing", False)),
        "channels_last": bool(args.channels_last), "training_callbacks": bool(args.callbacks),
        "optimizer": describe_optimizer(optimizer),
        "network_inputs": inputs.shapes,
        **sync_report(meter.result),
    }
    if args.compile:
        torch._dynamo.reset()
    return result


def run_reference(cfg: DictConfig, source: str, batch: Mapping[str, Any], device: torch.device,
                  args: argparse.Namespace) -> dict[str, Any]:
    """diffusers' network in the official-style plain loop (benchmarks/reference_loop.py)."""
    module_cfg = plain(cfg.stage.module)
    network = diffusers_network(args.stage, network_config(module_cfg["network"]))
    text_encoder = instantiate_network(module_cfg["text_encoder"])
    compressor = stage_a = None
    if args.stage == "c" and source == "images":
        compressor = load_network(Path(module_cfg["compressor_export"]), "compressor")
    elif args.stage == "b":
        compressor = instantiate_network(module_cfg["compressor"])
        stage_a = load_network(Path(module_cfg["stage_a_export"]))
    inputs = NetworkInputs(network)
    memory = PeakMemory(device)
    memory.reset()
    ema = module_cfg.get("ema") or {}
    torch.manual_seed(args.seed)
    loop = OfficialStyleLoop(
        args.stage, network, text_encoder, device, module_cfg["optim"], compressor=compressor, stage_a=stage_a,
        latent_mean=module_cfg.get("latent_mean", 42.0), latent_std=module_cfg.get("latent_std", 1.0),
        text_dropout=module_cfg.get("text_dropout", 0.05),
        effnet_zero_prob=module_cfg.get("effnet_zero_prob", 0.05),
        effnet_noise_prob=module_cfg.get("effnet_noise_prob", 0.3),
        effnet_noise_t_max=module_cfg.get("effnet_noise_t_max", 0.5),
        ema_every=int(ema.get("every", 100)), ema_start=int(ema.get("start", 5000)), seed=args.seed,
    )
    clock = StepClock(device)
    # The same meter as ours: marks at step ends, syncs counted from one step's start to the next's.
    meter = StepMeter(clock, count_step(args), "cuda" if device.type == "cuda" else None)
    batches = iter(batch_loader(batch, device))
    try:
        for step in range(args.warmup + args.steps):
            current = next(batches)
            meter.on_train_batch_start(None, None, current, step)
            loop.step(current)
            meter.on_train_batch_end(None, None, None, current, step)
    finally:
        meter.on_train_end(None, None)
    peak = memory.read()
    result = {
        "run": f"reference ({source})", "impl": "reference", "source": source, "network": type(network).__name__,
        "batch": len(batch["captions"]),
        "step_seconds": clock.step_seconds(skip=args.warmup), "step_cpu_seconds": clock.cpu_seconds(skip=args.warmup),
        "peak_memory_bytes": peak, "memory_kind": memory.kind, "memory_baseline_bytes": memory.baseline,
        "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
        "compile": False, "gradient_checkpointing": False, "channels_last": False,
        "optimizer": describe_optimizer(loop.optimizer),
        "network_inputs": inputs.shapes,
        **sync_report(meter.result),
    }
    return result


def count_flops(cfg: DictConfig, impl: str, stage: str, shapes: Mapping[str, list[int] | None]) -> int:
    """Counted forward + backward FLOPs of the network (ours or diffusers') on the recorded input shapes."""
    config = network_config(plain(cfg.stage.module.network))
    if impl == "ours":
        # No recomputation: model FLOPs, not what gradient checkpointing adds.
        def build():
            return instantiate_network({**config, "gradient_checkpointing": False})
    else:
        def build():
            return diffusers_network(stage, config)
    return count_on_meta(build, [], shapes)


# ---------------------------------------------------------------------------------------------- projection
def project_recipe(run: Mapping[str, Any], phases: list, device_name: str, on_gpu: bool):
    """``phases`` (projection.read_recipe) at ``run``'s median throughput on this device (projection.py).

    Energy is board power (the accounting table; the configured fallback on CPU) × the timed hours.
    """
    from wurst.train.accounting.carbon import default_pue, energy_kwh, resolve_carbon_intensity
    from wurst.train.accounting.ledger import Ledger
    from wurst.train.accounting.power import board_power_watts, fallback_watts
    from wurst.train.accounting.projection import project

    watts = board_power_watts(device_name) if on_gpu else None
    source = "table" if watts is not None else "configured"
    watts = watts if watts is not None else fallback_watts()
    steps = len(run["step_seconds"])
    hours = steps * run["step_s_median"] / 3600
    ledger = Ledger(
        device_hours=hours, wall_hours=hours, energy_kwh=energy_kwh(hours, watts), samples=steps * run["batch"],
        steps=steps, pue=default_pue(), carbon_intensity_kg_per_kwh=resolve_carbon_intensity(),
        device_name=device_name, power_source=source, world_size=1, segments=1,
    )
    return project(ledger, phases)


# ---------------------------------------------------------------------------------------------- report
def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:{spec}}{suffix}"


def render_table(result: Mapping[str, Any]) -> str:
    """The markdown table of every run, headed by what was measured where."""
    setup = result["setup"]
    lines = [
        f"Stage {setup['stage'].upper()} ({setup['config']}), compressor latent {setup['latent']}×{setup['latent']}"
        + (f", images {setup['image_size']} px" if setup.get("image_size") else "")
        + f", batch {setup['batch']} per device, on {setup['device_name']}"
        + f"; {setup['steps']} timed steps after {setup['warmup']} warm-up; peak "
        + ("bf16 " + _fmt(setup["peak_tflops"], ".0f", " TFLOP/s") if setup["peak_tflops"] else "FLOP/s n/a"),
        "",
        ("| run | network | step (ms, median) | samples/s | vs reference | peak memory (GiB) "
         "| model TFLOP/step | MFU | host syncs/step | optimizer |"),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in result["runs"]:
        if "error" in run:
            lines.append(f"| {run['run']} | {run.get('network', '')} | {run['error']} | | | | | | | |")
            continue
        step = _fmt(run["step_s_median"] * 1e3, ".1f")
        if run.get("cpu_s_median") is not None:
            step += f" (CPU {run['cpu_s_median'] * 1e3:.1f})"
        mfu = None if run["mfu"] is None else run["mfu"] * 100
        lines.append("| " + " | ".join([
            run["run"], run["network"], step, _fmt(run["samples_per_s"], ".2f"),
            _fmt(run.get("speedup_vs_reference"), ".2f", "×"), _fmt(run["peak_memory_bytes"] / 2**30, ".2f"),
            _fmt(run["flops_per_step"] and run["flops_per_step"] / 1e12, ".4g"), _fmt(mfu, ".1f", "%"),
            "n/a" if run["host_syncs"] is None else str(run["host_syncs"]), run["optimizer"],
        ]) + " |")
    memory_kinds = sorted({run["memory_kind"] for run in result["runs"] if "memory_kind" in run})
    cpu_note = "; CPU: process CPU time" if setup["device"] == "cpu" else ""
    syncs = ("reads of CUDA tensors" if setup["device"] == "cuda"
             else "every scalar read (on CPU an upper bound of the GPU's syncs)")
    legend = (f"step: wall time between step ends{cpu_note}; peak memory: {', '.join(memory_kinds)}; "
              f"host syncs: {syncs}")
    lines += ["", legend]
    return "\n".join(lines)


def render_projection(result: Mapping[str, Any], projections: Mapping[str, Any]) -> str:
    """The recipe projection at the fastest of our runs, then each run's total device-hours."""
    from wurst.train.accounting.projection import render

    setup = result["setup"]
    ours = [r for r in result["runs"] if r["impl"] == "ours" and r["run"] in projections]
    if not projections:
        return "No projection: no run finished."
    best = max(ours or [r for r in result["runs"] if r["run"] in projections], key=lambda r: r["samples_per_s"])
    latent = f"{setup['latent']}×{setup['latent']}"
    lines = [
        (f"Projected paper_v2 Stage {setup['stage'].upper()} recipe at {best['run']}'s throughput (the paper: "
         f"{PAPER_HOURS[setup['stage']]}). One throughput, measured at {latent}, scales every phase; phases at "
         "another resolution cost differently:"),
        "", render(projections[best["run"]]), "",
        "| run | projected device-hours, all phases |", "|---|---|",
    ]
    lines += [f"| {name} | {_fmt(p.total.device_hours, ',.0f')} |" for name, p in projections.items()]
    return "\n".join(lines)


def out_of_memory_run(name: str, impl: str, source: str, batch: int, error: BaseException) -> dict[str, Any]:
    """The record of a run that ran out of device memory (the table shows it; the rest go on)."""
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return {"run": name, "impl": impl, "source": source, "batch": batch,
            "error": f"out of memory at batch {batch}", "detail": first_line}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--config", choices=("tiny", "paper"), default="tiny", help="network sizes (conf/model/*)")
    parser.add_argument("--stage", choices=("c", "b"), default="c")
    parser.add_argument("--latent", type=int, default=None,
                        help="compressor latent side: 12 or 24 (paper phases); default: the config's (tiny: 3)")
    parser.add_argument("--from", dest="source", choices=("images", "cache", "both"), default=None,
                        help="our step's input: images (encoders every step), cache (Stage C), both; "
                             "default: both for Stage C, images for Stage B")
    parser.add_argument("--reference", choices=("images", "cache", "none"), default="images",
                        help="the official-style loop's input (default images: encoders every step)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compile needs more)")
    parser.add_argument("--batch", type=int, default=None, help="per-device batch; default global / --world-size")
    parser.add_argument("--world-size", type=int, default=None,
                        help=f"devices the global batch is split over (paper default {PAPER_WORLD_SIZE}, tiny 1)")
    parser.add_argument("--compile", action="store_true", help="torch.compile our network (compile=true)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--channels-last", action="store_true", help="our network in channels-last memory format")
    parser.add_argument("--callbacks", action="store_true",
                        help="add the callbacks every stage run has (progress bar, carbon ledger) to ours")
    parser.add_argument("--optim", choices=("adamw", "adamw8bit"), default=None, help="default: the config's")
    parser.add_argument("--precision", default=None,
                        help="our Trainer precision (default bf16-mixed on cuda, 32-true on cpu, as training)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's peak dense bf16 TFLOP/s, for GPUs the built-in table lacks")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None,
                        help="where to write the JSON (default outputs/bench/train_step_<config>_<stage>_<latent>_<device>.json)")
    parser.add_argument("--recipe", type=Path, default=None, help="recipe dir to project (default conf/experiment/paper_v2)")
    args = parser.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here; run on a GPU node or pass --device cpu")
    if args.source is None:
        args.source = "both" if args.stage == "c" else "images"
    if args.stage == "b" and (args.source != "images" or args.reference == "cache"):
        parser.error(
            "--stage b trains from images only: train/stage_b_module.py has no cached-latent input (its compressor "
            "trains jointly, and the module always encodes Stage A latents and text); use --from images"
        )
    if args.steps < 1 or args.warmup < 1:
        parser.error(f"--steps {args.steps} / --warmup {args.warmup}: both must be ≥ 1 (the first step is never timed)")
    if args.optim == "adamw8bit" and args.device == "cpu":
        parser.error("--optim adamw8bit needs CUDA (bitsandbytes' 8-bit AdamW); use --device cuda or --optim adamw")
    if args.precision is None:
        args.precision = "bf16-mixed" if args.device == "cuda" else "32-true"
    return args


def measure(args: argparse.Namespace, device: torch.device, peak: float | None) -> dict[str, Any]:
    """Runs ours (per ``--from``) and the reference on one composed config; returns setup + runs."""
    with tempfile.TemporaryDirectory(prefix="wurst-bench-") as tmp:
        cfg = compose_config(args.config, args.stage, args.latent, Path(tmp), args)
        sizes = stage_sizes(cfg, args.stage, args.latent)
        batch_size = per_device_batch(cfg, args)
        network_cfg = plain(cfg.stage.module.network)
        c_latent = int(plain(cfg.model.compressor).get("c_latent", 16))
        text_width = int(network_cfg["c_cond"] if args.stage == "c" else network_cfg["clip_embd"])
        sources = ["images", "cache"] if args.source == "both" else [args.source]
        if args.stage == "b" or "images" in sources or args.reference == "images":
            write_hand_off_exports(cfg, args.stage)

        plan = [("ours", source, run_ours) for source in sources]
        if args.reference != "none":
            plan.append(("reference", args.reference, run_reference))
        runs = []
        for impl, source, run in plan:
            batch = make_batch(args.stage, source, batch_size, sizes, c_latent, text_width, args.seed)
            try:
                runs.append(run(cfg, source, batch, device, args))
            except torch.cuda.OutOfMemoryError as error:
                runs.append(out_of_memory_run(f"{impl} ({source})", impl, source, batch_size, error))
            release_memory(device)

        # Model FLOPs per network (ours / diffusers'), on the input shapes a finished run recorded.
        shapes = next((r["network_inputs"] for r in runs if r.get("network_inputs")), None)
        flops = {impl: count_flops(cfg, impl, args.stage, shapes) if shapes else None
                 for impl in {r["impl"] for r in runs}}
    for run in runs:
        run["flops_per_step"] = flops[run["impl"]]
        if "error" in run:
            continue
        run.update(summarise_steps(run["step_seconds"], run["batch"]))
        run["cpu_s_median"] = statistics.median(run["step_cpu_seconds"]) if run["step_cpu_seconds"] else None
        run["mfu"] = (model_flops_utilisation(run["flops_per_step"], run["step_s_median"], peak)
                      if run["flops_per_step"] else None)
    reference = next((r for r in runs if r["impl"] == "reference" and "error" not in r), None)
    for run in runs:
        if "error" not in run:
            run["speedup_vs_reference"] = run["samples_per_s"] / reference["samples_per_s"] if reference else None
    setup = {
        "config": args.config, "stage": args.stage, "latent": sizes["latent"],
        "compressor_size": sizes["compressor_size"], "image_size": sizes.get("image_size"), "batch": batch_size,
    }
    return {"setup": setup, "runs": runs}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    device = torch.device(args.device)
    if device.type == "cuda":  # as train/run_stage.py does
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    peak = args.peak_tflops * 1e12 if args.peak_tflops else (
        peak_flops_per_s(device_name) if device.type == "cuda" else None)

    with warnings.catch_warnings():
        for message in (".*does not have many workers.*", ".*module\\(s\\) in eval mode.*", ".*`srun` command.*",
                        ".*LeafSpec.*"):
            warnings.filterwarnings("ignore", message)
        result = measure(args, device, peak)
    result["setup"].update(
        device=device.type, device_name=device_name, peak_tflops=peak / 1e12 if peak else None,
        steps=args.steps, warmup=args.warmup, threads=torch.get_num_threads() if device.type == "cpu" else None,
        torch=torch.__version__, argv=sys.argv[1:] if argv is None else list(argv),
    )

    from wurst.train.accounting.projection import DEFAULT_RECIPE, read_recipe

    phases = read_recipe(args.recipe or DEFAULT_RECIPE, phases=f"stage_{args.stage}_*")
    projections = {run["run"]: project_recipe(run, phases, device_name, device.type == "cuda")
                   for run in result["runs"] if "error" not in run}
    result["projection"] = {name: p.to_dict() for name, p in projections.items()}

    table = render_table(result)
    print(table + "\n\n" + render_projection(result, projections))
    latent = result["setup"]["latent"]
    path = args.json or REPO / "outputs" / "bench" / f"train_step_{args.config}_{args.stage}_{latent}_{device.type}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"\nJSON: {path}")
    return {**result, "table": table, "json": str(path)}


if __name__ == "__main__":
    main()
