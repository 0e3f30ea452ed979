"""Stage C: the text-conditional prior of Würstchen v2 (paper §3, Fig. 3 right; REFERENCE.md "The cascade").

Stage C denoises the semantic compressor's latents ``[B, 16, h, w]`` (scaled as ``(z + 1) / 42``, see
REFERENCE.md "Hand-offs") conditioned on CLIP-bigG per-token text states. It is a flat stack — no
down- or up-sampling — of ``depth`` repetitions of (ResBlock, TimestepBlock, AttnBlock) at width ``c``.

Module names equal diffusers' ``WuerstchenPrior`` so that public v2 prior weights load without a key map.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from wurst.models.common import AttnBlock, LayerNorm2d, ResBlock, TimestepBlock, timestep_embedding, unwrapped


class StageC(nn.Module):
    """The prior: ``eps = StageC(x_t, r, text)``.

    Args:
        c_in: channels of the compressor latent (16 in v2).
        c: width of every block (1536 in v2).
        c_cond: width of the text encoder's per-token states (1280 for CLIP-bigG).
        c_r: channels of the sinusoidal time embedding (64).
        depth: number of (ResBlock, TimestepBlock, AttnBlock) triples (32).
        nhead: attention heads (24).
        dropout: dropout in the ResBlock MLPs and attention (0.1).
        gradient_checkpointing: recompute each block in backward to save activation memory.
    """

    def __init__(
        self,
        c_in: int = 16,
        c: int = 1536,
        c_cond: int = 1280,
        c_r: int = 64,
        depth: int = 32,
        nhead: int = 24,
        dropout: float = 0.1,
        gradient_checkpointing: bool = False,
    ):
        super().__init__()
        if c % nhead != 0:
            raise ValueError(
                f"StageC width c={c} must be divisible by nhead={nhead}; pick c as a multiple of nhead"
            )
        self._arch = {
            "c_in": c_in, "c": c, "c_cond": c_cond, "c_r": c_r, "depth": depth, "nhead": nhead, "dropout": dropout
        }  # fmt: skip
        self.c_in, self.c_cond, self.c_r = c_in, c_cond, c_r
        self.gradient_checkpointing = gradient_checkpointing

        self.projection = nn.Conv2d(c_in, c, kernel_size=1)
        # Text states are mapped once to width c and shared by every AttnBlock (each then applies its
        # own kv_mapper); LeakyReLU(0.2) as in the public v2 prior.
        self.cond_mapper = nn.Sequential(nn.Linear(c_cond, c), nn.LeakyReLU(0.2), nn.Linear(c, c))
        self.blocks = nn.ModuleList()
        for _ in range(depth):
            self.blocks.append(ResBlock(c, dropout=dropout))
            self.blocks.append(TimestepBlock(c, c_r))
            self.blocks.append(AttnBlock(c, c, nhead, self_attn=True, dropout=dropout))
        # Two maps (a, b) per latent channel; the output formula is in `forward`.
        self.out = nn.Sequential(
            LayerNorm2d(c, elementwise_affine=False, eps=1e-6), nn.Conv2d(c, c_in * 2, 1)
        )
        self._init_weights(depth)

    def _init_weights(self, depth: int) -> None:
        """The initialisation of the authors' training code (diffusers' inference-only class drops it).

        Xavier-uniform weights and zero biases everywhere; small (std 0.02) input and conditioning maps;
        a zero output head, so a fresh prior predicts eps = x_t (a = b = 0); time modulation starting
        at the identity; residual MLP outputs scaled by 1/sqrt(depth) to keep the residual stream's
        variance flat through the stack.
        """
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.normal_(self.projection.weight, std=0.02)
        nn.init.normal_(self.cond_mapper[0].weight, std=0.02)
        nn.init.normal_(self.cond_mapper[-1].weight, std=0.02)
        nn.init.zeros_(self.out[1].weight)
        for block in self.blocks:
            if isinstance(unwrapped(block), ResBlock):
                with torch.no_grad():
                    block.channelwise[-1].weight.mul_(depth**-0.5)
            elif isinstance(unwrapped(block), TimestepBlock):
                nn.init.zeros_(block.mapper.weight)

    @property
    def config(self) -> dict:
        """The constructor kwargs (for export/config.json and the diffusers converters)."""
        return {**self._arch, "gradient_checkpointing": self.gradient_checkpointing}

    def _check_inputs(self, x: torch.Tensor, r: torch.Tensor, c: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.c_in:
            raise ValueError(
                f"StageC latent x has shape {tuple(x.shape)}; expected [B, c_in, h, w] = [B, {self.c_in}, h, w] "
                "(the semantic compressor's latents); check that the compressor's c_latent equals StageC c_in"
            )
        batch = x.shape[0]
        if r.shape != (batch,):
            raise ValueError(
                f"StageC time r has shape {tuple(r.shape)}; expected [B] = [{batch}] (one t in [0, 1] per "
                "sample); expand a scalar with r.expand(B)"
            )
        if c.ndim != 3 or c.shape[0] != batch or c.shape[-1] != self.c_cond:
            raise ValueError(
                f"StageC text embedding c has shape {tuple(c.shape)}; expected [B, L, c_cond] = "
                f"[{batch}, L, {self.c_cond}] (per-token text states); use a text encoder of width "
                f"{self.c_cond} or set StageC c_cond to the encoder's width"
            )

    def _run(self, block: nn.Module, *args: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def forward(self, x: torch.Tensor, r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Predict the noise of a noised compressor latent.

        Args:
            x: noised latent ``[B, c_in, h, w]``.
            r: diffusion time ``[B]`` in [0, 1].
            c: per-token text states ``[B, L, c_cond]``.
        Returns:
            eps prediction ``[B, c_in, h, w]``.
        """
        self._check_inputs(x, r, c)
        x_in = x
        x = self.projection(x)  # [B, c, h, w]
        text = self.cond_mapper(c)  # [B, L, c]
        time = timestep_embedding(r, self.c_r)  # [B, c_r]
        for block in self.blocks:
            if isinstance(unwrapped(block), AttnBlock):
                x = self._run(block, x, text)
            elif isinstance(unwrapped(block), TimestepBlock):
                x = self._run(block, x, time)
            else:
                x = self._run(block, x)
        # The public v2 prior's output parameterisation: the head predicts (a, b) and eps is read off as
        # (x_t - a) / (|1 - b| + 1e-5); kept as is so released weights mean the same thing here.
        a, b = self.out(x).chunk(2, dim=1)
        return (x_in - a) / ((1 - b).abs() + 1e-5)
