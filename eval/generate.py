"""Distributed, resumable generation of an evaluation's images: ``<out>/images/<id>.png``.

The sampler is any callable with the cascade's signature,
``sampler(captions, height, width, generator=[torch.Generator, ...]) -> images [B, 3, H, W] in [0, 1]``
(:class:`models.cascade.CascadeSampler`), given one generator per caption as diffusers does.

- Seeds: the prompt at index i (its line in the prompt file) draws all its noise from a generator
  seeded ``base_seed + i``, so an image depends neither on its batch nor on the number of ranks.
- Sharding: rank r of W takes the prompts with index ≡ r (mod W). Rank and world size come from
  :func:`wurst.data.topology.rank_and_world_size` (as for the data and training): an initialised
  ``torch.distributed`` process group, else torchrun's ``RANK``/``WORLD_SIZE``, else srun's
  ``SLURM_PROCID``/``SLURM_NTASKS``, else 0 and 1.
- Resume: an image is written to a temporary name and renamed, so ``<id>.png`` exists only when
  complete; prompts whose image exists are skipped.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from wurst.data.topology import rank_and_world_size
from wurst.eval.image_folder import to_pil, write_png_atomic
from wurst.eval.prompt_set import PromptRecord

Sampler = Callable[..., torch.Tensor]


@dataclass
class GenerationSummary:
    """What one rank did: ids written now, and ids skipped because their image already existed."""

    rank: int
    world_size: int
    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def _check_rank(rank: int, world_size: int) -> tuple[int, int]:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(
            f"rank {rank} / world_size {world_size}: need world_size ≥ 1 and 0 ≤ rank < world_size"
        )
    return rank, world_size


def shard(records: Sequence[PromptRecord], rank: int, world_size: int) -> list[PromptRecord]:
    """The prompts of ``rank``: every ``world_size``-th, starting at ``rank`` (balanced to ±1)."""
    _check_rank(rank, world_size)
    return [r for r in records if r.index % world_size == rank]


def prompt_generators(
    records: Sequence[PromptRecord], base_seed: int, device: str = "cpu"
) -> list[torch.Generator]:
    """One generator per prompt, seeded ``base_seed + index``."""
    return [torch.Generator(device=device).manual_seed(base_seed + r.index) for r in records]


def generate_images(
    sampler: Sampler,
    records: Sequence[PromptRecord],
    out_dir: str | Path,
    *,
    height: int,
    width: int,
    batch_size: int = 4,
    base_seed: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    generator_device: str = "cpu",
    progress: bool = True,
) -> GenerationSummary:
    """Generate this rank's missing images into ``out_dir`` (``<id>.png``); see the module docstring.

    ``rank``/``world_size`` default to :func:`rank_and_world_size`.
    """
    for name, value in (("height", height), ("width", width), ("batch_size", batch_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if (rank is None) != (world_size is None):
        raise ValueError("pass rank and world_size together (or neither, to read them from the environment)")
    rank, world_size = rank_and_world_size() if rank is None else _check_rank(rank, world_size)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = GenerationSummary(rank=rank, world_size=world_size)
    todo = []
    for record in shard(records, rank, world_size):
        if (out_dir / f"{record.id}.png").is_file():
            summary.skipped.append(record.id)
        else:
            todo.append(record)
    bar = tqdm(total=len(todo), desc=f"generate (rank {rank}/{world_size})", disable=not progress, unit="img")
    with bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            images = sampler(
                [r.caption for r in batch],
                height,
                width,
                generator=prompt_generators(batch, base_seed, generator_device),
            )
            _check_images(images, len(batch), height, width)
            for record, image in zip(batch, images):
                write_png_atomic(to_pil(image), out_dir / f"{record.id}.png")
                summary.written.append(record.id)
            bar.update(len(batch))
    return summary


def _check_images(images: object, count: int, height: int, width: int) -> None:
    if not isinstance(images, torch.Tensor) or tuple(images.shape) != (count, 3, height, width):
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(
            f"the sampler returned {shape} for {count} prompts at {height}×{width}; it must return a tensor "
            f"[{count}, 3, {height}, {width}] in [0, 1] (the CascadeSampler contract)"
        )
    if not torch.isfinite(images).all():
        raise ValueError(
            "the sampler returned non-finite pixels (NaN/inf); check the checkpoints and precision"
        )
