"""Global batch size → per-device batch size (DESIGN.md: the global batch is the config value)."""

from __future__ import annotations


def per_device_batch_size(global_batch_size: int, world_size: int, accumulate_grad_batches: int = 1) -> int:
    """global = per_device × world_size × accumulate; an indivisible combination is an error."""
    if global_batch_size is None or int(global_batch_size) < 1:
        raise ValueError(f"data.global_batch_size must be a positive integer, got {global_batch_size!r}")
    if world_size < 1 or accumulate_grad_batches < 1:
        raise ValueError(f"world size ({world_size}) and accumulate_grad_batches ({accumulate_grad_batches}) must be ≥ 1")
    divisor = world_size * accumulate_grad_batches
    if global_batch_size % divisor != 0:
        raise ValueError(
            f"data.global_batch_size={global_batch_size} is not divisible by world size {world_size} × "
            f"accumulate_grad_batches {accumulate_grad_batches} = {divisor}. Choose a global batch that is a "
            f"multiple of {divisor}, or change trainer.devices / trainer.num_nodes / accumulate_grad_batches."
        )
    return global_batch_size // divisor
