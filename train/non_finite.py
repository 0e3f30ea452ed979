"""Steps with a non-finite loss or gradients are skipped and counted; too many in a row stop the run.

One rule for every stage (A's two optimisers, B's and C's one): the check costs one host sync per step
(a single sum over the gradient norms), and under DDP it runs on the all-reduced gradients, so every
rank takes the same decision. The counters travel in the checkpoint. A skipped step also restores the
buffers its forward pass changed (BatchNorm running statistics, Stage A's running latent std): a NaN
batch would otherwise leave them NaN for every later step and for the export.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import lightning as L
import torch


def non_finite_message(module: L.LightningModule, count: int) -> str:
    from wurst.train.checkpointing import find_resume_checkpoint

    run_dir = getattr(module.trainer, "default_root_dir", None)
    last = find_resume_checkpoint(f"{run_dir}/checkpoints") if run_dir else None
    return (
        f"{count} consecutive steps with a non-finite loss or gradients, the last at step {module.global_step}; "
        f"stopping. Last good checkpoint: {last or 'none yet'}. Lower optim.lr, check the data "
        f"(data/* skip counts) or resume from that checkpoint with resume=<path>."
    )


class NonFiniteGuard:
    """Counts skipped steps (``skipped``) and the current run of them (``in_a_row``)."""

    CHECKPOINT_KEY = "non_finite_steps"

    def __init__(self, max_bad_steps: int):
        if int(max_bad_steps) < 1:
            raise ValueError(f"max_bad_steps={max_bad_steps} must be ≥ 1 (consecutive bad steps that stop a run)")
        self.max_bad_steps = int(max_bad_steps)
        self.skipped = 0
        self.in_a_row = 0
        self._buffers: list[tuple[torch.Tensor, torch.Tensor]] = []

    def remember_buffers(self, module: torch.nn.Module) -> None:
        """Before the step's forward pass: a copy of the floating buffers it may update (not the EMA's)."""
        self._buffers = [
            (buffer, buffer.detach().clone())
            for name, buffer in module.named_buffers()
            if buffer.is_floating_point() and not name.startswith("ema.")
        ]

    def step_is_finite(
        self, module: L.LightningModule, loss: torch.Tensor | None, parameters: Iterable[torch.nn.Parameter]
    ) -> bool:
        """After backward: True to step; False (counted, logged) to skip; raises after ``max_bad_steps``."""
        grads = [p.grad for p in parameters if p.grad is not None]
        flag = torch.stack(torch._foreach_norm(grads)).sum() if grads else torch.zeros((), device=module.device)
        if loss is not None:
            flag = flag + loss.detach().float().sum()
        if bool(torch.isfinite(flag)):
            self.in_a_row = 0
            return True
        self.skipped += 1
        self.in_a_row += 1
        with torch.no_grad():
            for buffer, saved in self._buffers:
                buffer.copy_(saved)
        module.log("train/skipped_steps", float(self.skipped), batch_size=1)
        if self.in_a_row >= self.max_bad_steps:
            raise FloatingPointError(non_finite_message(module, self.in_a_row))
        return False

    def save(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[self.CHECKPOINT_KEY] = {"skipped": self.skipped, "in_a_row": self.in_a_row}

    def load(self, checkpoint: dict[str, Any]) -> None:
        counts = checkpoint.get(self.CHECKPOINT_KEY, {})
        self.skipped = int(counts.get("skipped", 0))
        self.in_a_row = int(counts.get("in_a_row", 0))
