"""One stage run, top to bottom: check inputs, build trainer, data, module; fit; export.

Everything that can be wrong with the inputs (a missing hand-off export, an indivisible batch, a bad
``init_from``) is checked before a network or a data worker is built.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import hydra.utils
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from wurst.data.datamodule import per_device_batch_size
from wurst.train.checkpointing import AtomicCheckpointIO, PeriodicCheckpoint, find_resume_checkpoint
from wurst.train.export import (
    BrokenExportError,
    export_command,
    git_revision,
    read_config,
    require_export,
    write_network,
    write_provenance,
)
from wurst.train.networks import network_config
from wurst.train.previews import PreviewError, PreviewGrid

log = logging.getLogger(__name__)

STAGES = ("a", "b", "c")


def plain(cfg: Any) -> Any:
    """A resolved plain-Python copy of a config node (checkpoints and JSON take only these)."""
    return OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else cfg


def check_stage_inputs(cfg: DictConfig) -> None:
    """Every artifact the run will read, previews included, checked before anything is built (DESIGN.md
    hand-off): present, complete (safetensors header and length, JSON, provenance), the expected classes,
    and the latent channels each hand-off needs. Stage B reads Stage A's export (targets, previews);
    Stage C the compressor of Stage B's export (training) and Stage B + A (previews); ``init_from`` its
    previous phase's export. Each error names the file, what is wrong and the command that rebuilds it."""
    stage = cfg.stage.name
    if stage not in STAGES:
        raise ValueError(f"stage.name={stage!r}: use one of {STAGES}")
    module = cfg.stage.module
    place = {"group": str(cfg.group), "extra": location_overrides(cfg)}
    if stage == "b":
        a_dir = require_export(module.stage_a_export, "a", why="Stage B trains on Stage A latents", **place)
        a_config = read_config(a_dir)
        for key in ("c_in", "c_out"):
            expect_same(a_dir / "config.json", "latent_channels", a_config.get("latent_channels"),
                        f"stage.module.network.{key}", module.network.get(key), "a", place)
    if stage == "c" and module.get("compressor_export") is not None:
        b_dir = require_export(module.compressor_export, "b", names=("compressor",),
                               why="Stage C trains on its frozen compressor", **place)
        # The previews run the cascade through this Stage C and the same pipeline's Stage B and A.
        require_export(b_dir, "b", names=("model", "text_encoder"), why="Stage C's previews decode with Stage B", **place)
        a_dir = require_export(b_dir.parent.parent / "stage_a" / "export", "a",
                               why="Stage C's previews decode with Stage A", **place)
        compressor, stage_b, stage_a = read_config(b_dir, "compressor"), read_config(b_dir), read_config(a_dir)
        expect_same(b_dir / "compressor_config.json", "c_latent", compressor.get("c_latent"),
                    "stage.module.network.c_in", module.network.get("c_in"), "b", place)
        expect_same(b_dir / "config.json", "effnet_embd", stage_b.get("effnet_embd"),
                    "the compressor's c_latent", compressor.get("c_latent"), "b", place)
        expect_same(b_dir / "config.json", "c_in", stage_b.get("c_in"),
                    "Stage A's latent_channels", stage_a.get("latent_channels"), "b", place)
    init = cfg.get("init_from")
    if init:
        path = Path(init["path"])
        mode = init.get("mode", "weights")
        if mode == "weights":
            names = ("model", "compressor") if stage == "b" and (path / "compressor.safetensors").is_file() else ("model",)
            require_export(path, stage, names=names, why="init_from (weights) points at a previous phase's export",
                           **place)
        elif mode == "full":
            if not path.is_file():
                raise FileNotFoundError(f"init_from.path={path} (mode full) must be a .ckpt file; it does not exist")
        else:
            raise ValueError(f"init_from.mode={mode!r}: use 'weights' (an export dir) or 'full' (a .ckpt file)")


def location_overrides(cfg: DictConfig) -> list[str]:
    """Overrides a rebuild command needs to write where this run reads (a non-default output root)."""
    output_dir = OmegaConf.select(cfg, "paths.output_dir")
    return [] if output_dir in (None, "outputs") else [f"paths.output_dir={output_dir}"]


def expect_same(path: Path, key: str, value: Any, needed_by: str, needed: Any, stage: str,
                place: dict[str, Any]) -> None:
    """An exported config value that this run's networks must match (latent channels of a hand-off)."""
    if value is None or needed is None or value == needed:
        return
    command = export_command(path.parent, stage, place["group"], place["extra"])
    raise BrokenExportError(
        f"{path} has {key}={value!r}, but {needed_by} is {needed!r}: the export does not fit this run. "
        f"Rebuild it with `{command}` using the same model configs, or change this run's config to match."
    )


def build_loggers(cfg: DictConfig, run_dir: Path) -> list:
    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    loggers: list = []
    if cfg.logger.get("csv", True):
        loggers.append(CSVLogger(save_dir=str(run_dir), name="logs", version=""))
    wb = cfg.logger.get("wandb", {})
    if wb.get("enabled", False):
        mode = wb.get("mode", "auto")
        if mode == "auto":
            mode = "online" if _wandb_logged_in() else "offline"
        if mode != "disabled":
            id_file = run_dir / "wandb_id.txt"
            run_id = id_file.read_text().strip() if id_file.is_file() else None
            logger = WandbLogger(
                project=wb.get("project", "wurst"), entity=wb.get("entity"), save_dir=str(run_dir), mode=mode,
                id=run_id, resume="allow", name=f"{cfg.group}/{cfg.phase}",
            )
            loggers.append(logger)
    return loggers


def _wandb_logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path.home() / ".netrc"
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def build_trainer(cfg: DictConfig, run_dir: Path, callbacks: list, loggers: list) -> L.Trainer:
    trainer_cfg = plain(cfg.trainer)
    if cfg.stage.name == "a":
        # Stage A optimises manually (generator + discriminator): Lightning must not clip for it.
        trainer_cfg.pop("gradient_clip_val", None)
        trainer_cfg.pop("gradient_clip_algorithm", None)
    from wurst.slurm.preemption import CheckpointOnTerminate, slurm_plugins

    # Under SLURM: checkpoint + requeue on the --signal warning, checkpoint on SIGTERM (scontrol
    # requeue, preemption); resume=auto then finds the hpc_ckpt_*.ckpt in run_dir (slurm/preemption.py).
    return hydra.utils.instantiate(
        trainer_cfg,
        default_root_dir=str(run_dir),
        callbacks=[*callbacks, CheckpointOnTerminate()],
        logger=loggers or False,
        plugins=[*slurm_plugins(), AtomicCheckpointIO()],
        accumulate_grad_batches=int(cfg.accumulate_grad_batches),
        _convert_="all",
    )


def build_module(cfg: DictConfig, device: str | torch.device = "cpu") -> L.LightningModule:
    """The stage's LightningModule; ``device="meta"`` builds it without memory (config checks)."""
    module_cfg = plain(cfg.stage.module)
    cls = hydra.utils.get_class(module_cfg.pop("_target_"))
    with torch.device(device):
        module = cls(**module_cfg)
    if cfg.get("gradient_checkpointing"):
        module.network.gradient_checkpointing = True
    return module


def apply_init_from(cfg: DictConfig, module: L.LightningModule) -> None:
    init = cfg.get("init_from")
    if not init:
        return
    from safetensors.torch import load_file

    path = Path(init["path"])
    if init.get("mode", "weights") == "weights":
        state = load_file(str(path / "model.safetensors"))
        module.network.load_state_dict(state)
        if getattr(module, "ema", None) is not None:
            module.ema.shadow.load_state_dict(state)
        extra = path / "compressor.safetensors"
        if cfg.stage.name == "b" and extra.is_file():
            module.compressor.load_state_dict(load_file(str(extra)))
    else:
        ckpt = AtomicCheckpointIO().load_checkpoint(path)  # CRC-checked, weights_only
        module.load_state_dict(ckpt["state_dict"])
    log.info("initialised from %s (%s)", path, init.get("mode", "weights"))


def resolve_resume(cfg: DictConfig, run_dir: Path) -> str | None:
    resume = cfg.get("resume")
    if resume in (None, False, "none", "null"):
        return None
    if resume == "auto":
        found = find_resume_checkpoint(run_dir / "checkpoints")
        hpc = find_resume_checkpoint(run_dir)  # Lightning's SLURM hpc_ckpt_*.ckpt land in the root dir
        candidates = [p for p in (found, hpc) if p is not None]
        if not candidates:
            return None
        return str(max(candidates, key=lambda p: p.stat().st_mtime_ns))
    path = Path(str(resume))
    if not path.is_file():
        raise FileNotFoundError(f"resume={path} does not exist; use resume=auto, resume=null or a .ckpt path")
    return str(path)


def build_datamodule(cfg: DictConfig) -> L.LightningDataModule:
    """The data module of ``cfg.data`` at this stage's resolutions (``stage.data``)."""
    data_cfg = plain(cfg.data)
    sizes = plain(cfg.stage.get("data", {})) or {}
    if not data_cfg.get("cached", False):
        image, compressor = sizes.get("image_size"), sizes.get("compressor_size")
        if image is None:  # Stage C reads only the compressor's input
            image, compressor = compressor, None
        if image is not None:
            data_cfg["resolution"] = int(image)
        data_cfg["compressor_resolution"] = None if compressor is None else int(compressor)
    return hydra.utils.instantiate(data_cfg, _convert_="all")


def data_provenance(datamodule: L.LightningDataModule) -> dict[str, Any]:
    from wurst.data.shard_spec import expand_shards, shard_list_digest

    out: dict[str, Any] = {}
    try:
        urls = expand_shards(datamodule.shards)
        out["dataset"] = {"shards": len(urls), "shard_list_hash": shard_list_digest(urls)}
    except (ValueError, OSError):
        pass
    stats = getattr(datamodule, "stats", None)
    if stats is not None:
        out.setdefault("dataset", {})["counts"] = stats.state_dict()
    return out


def export_stage(cfg: DictConfig, trainer: L.Trainer, module: L.LightningModule, run_dir: Path,
                 extra_provenance: dict[str, Any]) -> Path:
    export_dir = run_dir / "export"
    config = network_config(plain(cfg.stage.module.network))
    config.update(getattr(module, "export_config_updates", dict)())
    write_network(export_dir, "model", module.export_network(), config)
    for name, (net, net_cfg) in getattr(module, "export_networks", dict)().items():
        write_network(export_dir, name, net, network_config(net_cfg))
    text_encoder = getattr(module, "text_encoder", None)
    if text_encoder is not None:
        # A fine-tune's text encoder is its base's (train/finetune.py), whatever the config names.
        te_cfg = getattr(module, "text_encoder_config", None) or network_config(plain(cfg.stage.module.text_encoder))
        if te_cfg.get("pretrained"):
            (export_dir / "text_encoder_config.json").write_text(json.dumps(te_cfg, indent=2))
        else:  # randomly initialised (tiny) encoders must travel with their weights
            write_network(export_dir, "text_encoder", text_encoder, te_cfg)
    for file_name, content in getattr(module, "export_files", dict)().items():
        (export_dir / file_name).write_text(json.dumps(content, indent=2))
    params = sum(p.numel() for p in module.export_network().parameters())
    provenance = {
        "stage": cfg.stage.name,
        "phase": cfg.phase,
        "group": cfg.group,
        "git_revision": git_revision(),
        "steps": int(trainer.global_step),
        "params": int(params),
        "config": plain(cfg),
        **extra_provenance,
    }
    # Files beyond networks and JSON (a LoRA run's diffusers-layout adapter), before provenance marks it complete.
    getattr(module, "write_export_extras", lambda *_: None)(export_dir, provenance)
    write_provenance(export_dir, provenance)
    return export_dir


def train_stage(cfg: DictConfig) -> dict[str, Any]:
    """Trains ``cfg.stage`` into ``cfg.run_dir``; returns the final metrics."""
    if cfg.get("stage") is None:
        raise ValueError("no stage selected: pass stage=a|b|c or an experiment that selects one")
    max_steps = OmegaConf.select(cfg, "trainer.max_steps")
    if max_steps is not None and int(max_steps) <= 0:  # 0 would export untrained weights; -1 never ends
        raise ValueError(f"trainer.max_steps={max_steps}: a stage run needs a positive number of optimizer steps, "
                         "e.g. trainer.max_steps=1000 (nothing was trained or written)")
    check_stage_inputs(cfg)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    from wurst.train.callbacks import build_callbacks

    callbacks = build_callbacks(cfg, run_dir)
    callbacks.append(PeriodicCheckpoint(run_dir / "checkpoints", int(cfg.checkpoint_every), int(cfg.keep_checkpoints)))
    loggers = build_loggers(cfg, run_dir)
    trainer = build_trainer(cfg, run_dir, callbacks, loggers)
    per_device_batch_size(cfg.data.global_batch_size, trainer.world_size, int(cfg.accumulate_grad_batches))
    datamodule = build_datamodule(cfg)

    module = build_module(cfg)
    apply_init_from(cfg, module)
    if cfg.get("compile"):
        # In place (nn.Module.compile): the state dict keeps its names, so checkpoints, EMA and exports of
        # compiled and eager runs are interchangeable (torch.compile's wrapper would prefix "_orig_mod.").
        module.network.compile()
    for lg in loggers:
        if hasattr(lg, "experiment") and lg.__class__.__name__ == "WandbLogger" and trainer.is_global_zero:
            (run_dir / "wandb_id.txt").write_text(lg.experiment.id)
    ckpt_path = resolve_resume(cfg, run_dir)
    if ckpt_path:
        log.info("resuming from %s", ckpt_path)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
    if cfg.get("compile"):
        metrics["compile/graph_breaks"] = float(report_graph_breaks())
    # The final checkpoint was written at the end of fit; the export comes next, the preview last, so
    # a failing preview (or one that is killed) never costs the trained weights.
    previews = next((cb for cb in callbacks if isinstance(cb, PreviewGrid)), None)
    if trainer.is_global_zero:
        extra = {"metrics": metrics, **data_provenance(datamodule)}
        for cb in callbacks:
            if hasattr(cb, "provenance"):
                extra.update(cb.provenance())
        export_dir = export_stage(cfg, trainer, module, run_dir, extra)
        log.info("Stage %s export: %s", cfg.stage.name.upper(), export_dir)
        if previews is not None:
            previews.final(trainer, module)
    if any(lg.__class__.__name__ == "WandbLogger" for lg in loggers):
        import wandb

        wandb.finish()  # the next stage of a pipeline gets its own run
    if trainer.is_global_zero and previews is not None and previews.failures:
        raise_preview_failures(cfg, trainer, run_dir, previews.failures, metrics)
    return metrics


def report_graph_breaks() -> int:
    """How often dynamo broke the compiled network's graph in this process (each break is a slow path on
    a GPU); logged with its reasons, and returned for the run's metrics."""
    from torch._dynamo.utils import counters

    breaks = counters["graph_break"]
    total = sum(breaks.values())
    if total:
        log.warning("compile=true: %d graph break(s) in the network: %s", total, dict(breaks.most_common(5)))
    return total


def raise_preview_failures(cfg: DictConfig, trainer: L.Trainer, run_dir: Path, failures: list[str],
                           metrics: dict[str, float]) -> None:
    """Ends a run whose weights are safe but whose previews failed: loudly, with a non-zero exit status,
    so a chained job or a pipeline notices; the checkpoint and the export stay where they are."""
    checkpoints = sorted((run_dir / "checkpoints").glob("step-*.ckpt"))
    message = (
        f"Stage {cfg.stage.name.upper()} trained to step {trainer.global_step}; its final checkpoint "
        f"({checkpoints[-1] if checkpoints else 'none'}) and export ({run_dir / 'export'}) are written and kept, "
        f"but {len(failures)} preview(s) failed (tracebacks above): " + "; ".join(failures)
        + ". The export is usable as it is; once the cause is fixed, rerunning the same command (resume=auto) "
        "only redoes the export and the preview."
    )
    log.error(message)
    error = PreviewError(message)
    error.metrics = metrics
    raise error
