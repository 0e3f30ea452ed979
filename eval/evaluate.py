"""One evaluation run: (generate), score, report — what ``wurst-eval`` does with ``conf/eval/eval.yaml``.

1. Prompts from the prompt file (first ``limit``); the FID references and every enabled metric's
   weights are found (local path, cache or an allowed download, ``eval/metric_weights.py``) before
   anything is generated.
2. When ``pipeline`` is set, the cascade (``generation.sampler``) writes this rank's missing images
   to ``images`` (default ``<out>/images``); ranks then meet at a barrier and only rank 0 goes on.
   Rank, world size and local rank are the data's and training's (``wurst.data.topology``): under
   torchrun or ``srun`` (one task per GPU) alike; the barrier's gloo group meets at torchrun's
   MASTER_ADDR/MASTER_PORT, or under srun where Lightning's SLURM environment puts DDP's rendezvous.
3. Metrics over the prompt set's images: FID against ``references`` and IS (both after the
   reference preprocessing at ``resolution``), CLIP score and PickScore of each image with its
   caption, PickScore preference against other models' folders.
4. ``<out>/metrics.json``, ``<out>/results.md`` (our row beside ``paper.rows``), ``<out>/samples.png``.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from tqdm.auto import tqdm

from wurst.data.topology import launched_by, local_rank, rank_and_world_size
from wurst.eval.clip_score import ClipScore
from wurst.eval.generate import generate_images
from wurst.eval.image_folder import (
    images_for_prompts,
    list_images,
    load_rgb,
    resize_center_crop,
    to_uint8_batch,
)
from wurst.eval.inception import build_fid, build_inception_score
from wurst.eval.metric_weights import check_references, resolve_metric_weights
from wurst.eval.pickscore import PickScore, preference
from wurst.eval.prompt_set import read_prompt_file
from wurst.eval.report import write_metrics_json, write_results_table, write_sample_grid

log = logging.getLogger(__name__)


def resolve_device(device: str | None) -> torch.device:
    """``auto``/None → ``cuda:<local rank>`` (LOCAL_RANK under torchrun, SLURM_LOCALID under srun) when
    available, else ``cpu``."""
    if device in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank())
        return torch.device("cpu")
    return torch.device(device)


def _batches(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def rendezvous() -> str:
    """The gloo group's ``init_method``: torchrun's MASTER_ADDR/MASTER_PORT (``env://``), else under srun
    the address and port Lightning's SLURM environment gives DDP (first node of SLURM_NODELIST, a port
    from SLURM_JOB_ID; MASTER_ADDR/MASTER_PORT override them)."""
    if "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ:
        return "env://"
    if launched_by() == "slurm":
        from lightning.fabric.plugins.environments import SLURMEnvironment

        # Its address and port read only the environment; __init__'s checks are Lightning's rules for
        # training jobs (e.g. no bare --ntasks), which an evaluation need not follow.
        slurm = SLURMEnvironment.__new__(SLURMEnvironment)
        return f"tcp://{slurm.main_address}:{slurm.main_port}"
    raise RuntimeError(
        "wurst-eval runs as one of several ranks but neither torchrun (MASTER_ADDR/MASTER_PORT) nor srun "
        "(SLURM_PROCID/SLURM_NTASKS) set a rendezvous; launch it with torchrun or srun"
    )


def _join_process_group(rank: int, world_size: int) -> bool:
    """With several ranks (torchrun or srun), start a gloo group for the after-generation barrier."""
    dist = torch.distributed
    if world_size == 1 or not dist.is_available() or dist.is_initialized():
        return False
    # Ranks finish their shards at different times; the barrier must outwait the slowest.
    dist.init_process_group(
        "gloo", init_method=rendezvous(), rank=rank, world_size=world_size, timeout=datetime.timedelta(hours=24)
    )
    return True


def run_generation(cfg: DictConfig, records: Sequence[Any], images_dir: Path, device: torch.device) -> str:
    """Build the sampler from ``generation.sampler``, write this rank's missing images; returns the
    sampler's settings (for results.md)."""
    node = cfg.generation.sampler
    if node is None:
        raise ValueError(
            "pipeline= is set but generation.sampler is null; give it a `_target_` that builds the cascade"
        )
    overrides = {"device": str(device)} if OmegaConf.select(node, "device") == "auto" else {}
    sampler = instantiate(node, **overrides)
    gen = cfg.generation
    summary = generate_images(
        sampler,
        records,
        images_dir,
        height=gen.height,
        width=gen.width,
        batch_size=gen.batch_size,
        base_seed=gen.seed,
        generator_device=gen.generator_device,
        progress=cfg.progress,
    )
    log.info(
        "rank %d/%d: wrote %d images, %d already there",
        summary.rank,
        summary.world_size,
        len(summary.written),
        len(summary.skipped),
    )
    describe = getattr(sampler, "describe", None)
    return f"{OmegaConf.select(node, 'sampler') or 'custom'} ({describe()})" if describe else type(sampler).__name__


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Run the evaluation described by ``cfg`` (``conf/eval/eval.yaml``); returns the metrics (rank 0)."""
    records = read_prompt_file(cfg.prompts, cfg.limit)
    out = Path(cfg.out)
    images_dir = Path(cfg.images) if cfg.images else out / "images"
    device = resolve_device(cfg.device)
    rank, world_size = rank_and_world_size()
    # Everything scoring needs is found before the first image is generated (hours of GPU time on
    # COCO-30K): the FID references and every metric's weights, on every rank, so all ranks stop together.
    check_references(cfg)
    resolve_metric_weights(cfg)
    own_group = _join_process_group(rank, world_size)
    sampler = None
    try:
        if cfg.pipeline is not None:
            sampler = run_generation(cfg, records, images_dir, device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
    finally:
        if own_group:
            torch.distributed.destroy_process_group()
    if rank != 0:
        return {}
    paths = images_for_prompts(images_dir, records, what="generated images")
    metrics = score(cfg, records, paths, device)
    settings = {
        "name": cfg.name,
        "prompts": str(cfg.prompts),
        "images_dir": str(images_dir),
        "num_images": len(records),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    if sampler is not None:
        settings["sampler"] = sampler
    out.mkdir(parents=True, exist_ok=True)
    write_metrics_json(out / "metrics.json", metrics, settings)
    write_results_table(out / "results.md", cfg.name, metrics, len(records), list(cfg.paper.rows), sampler=sampler)
    if cfg.grid.count > 0:
        write_sample_grid(paths[: cfg.grid.count], out / "samples.png", cfg.grid.columns, cfg.grid.tile)
    log.info("metrics: %s (written to %s)", metrics, out)
    return metrics


def decoded_batches(
    paths: Sequence[Path], batch_size: int, workers: int = 4, desc: str = "", progress: bool = True
) -> Iterator[list[Image.Image]]:
    """Batches of decoded RGB images, in order; a thread pool decodes up to ``2·workers`` batches ahead
    (PNG decoding, not the metric networks, bounds the speed of scoring 30,000 images)."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        pending: deque[Future] = deque()
        batches = iter(_batches(paths, batch_size))
        bar = tqdm(total=len(paths), desc=desc, disable=not progress, unit="img")
        with bar:
            while True:
                while len(pending) < 2 * max(1, workers):
                    batch = next(batches, None)
                    if batch is None:
                        break
                    pending.append(pool.submit(lambda b: [load_rgb(p) for p in b], batch))
                if not pending:
                    return
                images = pending.popleft().result()
                bar.update(len(images))
                yield images


def build_metrics(cfg: DictConfig, device: torch.device) -> dict[str, Any]:
    """The enabled metric objects of ``cfg.metrics`` on ``device``."""
    m = cfg.metrics
    if m.fid.enabled and not cfg.references:
        raise ValueError(
            "FID needs reference images: pass references=<folder> "
            "(`wurst-data coco30k` writes <out>/references) "
            "or metrics.fid.enabled=false"
        )
    metrics: dict[str, Any] = {}
    if m.fid.enabled:
        metrics["fid"] = build_fid(m.fid.weights, m.fid.feature, m.fid.antialias).to(device)
    if m.inception_score.enabled:
        s = m.inception_score
        metrics["inception_score"] = build_inception_score(s.weights, s.feature, s.splits, s.antialias).to(
            device
        )
    if m.clip_score.enabled:
        c = m.clip_score
        metrics["clip_score"] = ClipScore(c.model, c.backend, c.pretrained, device, c.processor)
    if m.pickscore.enabled:
        metrics["pickscore"] = PickScore(m.pickscore.model, m.pickscore.processor, device)
    return metrics


def score(
    cfg: DictConfig, records: Sequence[Any], paths: Sequence[Path], device: torch.device
) -> dict[str, Any]:
    """All enabled metrics for ``paths[i]`` generated from ``records[i]``."""
    built = build_metrics(cfg, device)
    fid, inception_score = built.get("fid"), built.get("inception_score")
    clip, pick = built.get("clip_score"), built.get("pickscore")
    captions = [r.caption for r in records]

    def pixels(images: list[Image.Image]) -> torch.Tensor:
        # The reference preprocessing, for our images as for the references (eval.image_folder).
        return to_uint8_batch([resize_center_crop(image, cfg.resolution) for image in images]).to(device)

    done = 0
    for images in decoded_batches(paths, cfg.batch_size, cfg.loader_workers, "score", cfg.progress):
        batch_captions, done = captions[done : done + len(images)], done + len(images)
        if fid is not None or inception_score is not None:
            batch_pixels = pixels(images)
            if fid is not None:
                fid.update(batch_pixels, real=False)
            if inception_score is not None:
                inception_score.update(batch_pixels)
        if clip is not None:
            clip.update(images, batch_captions)
        if pick is not None:
            pick.update(images, batch_captions)

    metrics: dict[str, Any] = {}
    if fid is not None:
        references = list_images(cfg.references, what="reference folder")
        for images in decoded_batches(
            references, cfg.batch_size, cfg.loader_workers, "references", cfg.progress
        ):
            fid.update(pixels(images), real=True)
        metrics["fid"] = float(fid.compute())
        metrics["fid_references"] = len(references)
    if inception_score is not None:
        mean, std = inception_score.compute()
        metrics["inception_score"], metrics["inception_score_std"] = float(mean), float(std)
    if clip is not None:
        metrics["clip_score"] = clip.compute()
    if pick is not None:
        metrics["pickscore"] = pick.compute()
        preferences = {}
        for other, folder in (cfg.metrics.pickscore.compare or {}).items():
            other_paths = images_for_prompts(folder, records, what=f"comparison images of {other}")
            theirs, done = [], 0
            for images in decoded_batches(
                other_paths, cfg.batch_size, cfg.loader_workers, str(other), cfg.progress
            ):
                theirs.append(pick.score(images, captions[done : done + len(images)]))
                done += len(images)
            preferences[str(other)] = preference(pick.scores(), torch.cat(theirs))
        if preferences:
            metrics["pickscore_preference"] = preferences
    return metrics
