"""Stage B: the DiffNeXt latent-diffusion decoder (Würstchen v2, REFERENCE.md "The cascade").

Stage B denoises Stage A's continuous latents ``[B, 4, H, W]`` (divided by Stage A's scale factor,
REFERENCE.md "Hand-offs") conditioned on

* the semantic compressor's latents ``[B, 16, h, w]`` ("effnet"), bicubic-resized to every level's
  resolution and mapped by a 1×1 conv to ``c_cond`` channels, then fed to each ResBlock of that
  level as extra channels;
* CLIP-H per-token text states ``[B, L, 1024]``, mapped to ``c_cond`` and cross-attended to by the
  attention blocks;
* the diffusion time ``r`` in [0, 1] through a sinusoidal embedding and TimestepBlocks.

The network is a U-Net of ConvNeXt-style blocks: PixelUnshuffle patching, ``len(c_hidden)`` levels
down (2×2 strided conv between levels) and up (2×2 transposed conv), a skip from each down level
to the first block of the same up level, and PixelShuffle back to the latent resolution.

Module and parameter names are those of diffusers' ``WuerstchenDiffNeXt`` (the public v2
decoder), so state dicts interchange without a key mapping; the forward pass computes the same
function (tested to 1e-5 in float32).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from wurst.models.common import (
    AttnBlock,
    GlobalResponseNorm,
    LayerNorm2d,
    TimestepBlock,
    timestep_embedding,
    unwrapped,
)

BLOCK_TYPES = {"C": "ResBlockStageB", "T": "TimestepBlock", "A": "AttnBlock"}
# Lower bound of the predicted noise scale b (the official forward's eps=1e-3).
_B_EPS = 1e-3


class ResBlockStageB(nn.Module):
    """ConvNeXt block of DiffNeXt: the skip joins *after* the depthwise conv, in the MLP's input.

    (Stage C's ``ResBlock`` concatenates the skip before the depthwise conv instead; the v2
    checkpoints fix which one each stage uses.)
    x: ``[B, c, H, W]``, x_skip: ``[B, c_skip, H, W]`` or None → ``[B, c, H, W]``.
    """

    def __init__(self, c: int, c_skip: int = 0, kernel_size: int = 3, dropout: float = 0.0):
        super().__init__()
        self.depthwise = nn.Conv2d(c, c, kernel_size=kernel_size, padding=kernel_size // 2, groups=c)
        self.norm = LayerNorm2d(c, elementwise_affine=False, eps=1e-6)
        self.channelwise = nn.Sequential(
            nn.Linear(c + c_skip, c * 4),
            nn.GELU(),
            GlobalResponseNorm(c * 4),
            nn.Dropout(dropout),
            nn.Linear(c * 4, c),
        )

    def forward(self, x: torch.Tensor, x_skip: torch.Tensor | None = None) -> torch.Tensor:
        residual = x
        x = self.norm(self.depthwise(x))
        if x_skip is not None:
            x = torch.cat([x, x_skip], dim=1)
        return self.channelwise(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) + residual


class StageB(nn.Module):
    """DiffNeXt, Würstchen v2's Stage B. Defaults are the v2 decoder (1,055.4 M parameters).

    Args (diffusers ``WuerstchenDiffNeXt``'s, same defaults):
        c_in / c_out: latent channels (Stage A's 4).
        c_r: width of the sinusoidal time embedding (REFERENCE.md: 64).
        patch_size: PixelUnshuffle factor of the input embedding.
        c_cond: width of the conditioning sequence (CLIP) and of the injected effnet features.
        c_hidden, nhead, blocks, level_config, inject_effnet: one entry per U-Net level;
            ``level_config`` spells each repeated block group with ``C`` (ResBlock), ``T``
            (TimestepBlock), ``A`` (AttnBlock); ``nhead`` only matters at levels with ``A``.
        effnet_embd: channels of the semantic compressor's latent (16).
        clip_embd: width of the text encoder's per-token states (CLIP-H: 1024).
        kernel_size: depthwise conv kernel of the ResBlocks.
        dropout: one float, or one per level.
        gradient_checkpointing: recompute each block in the backward pass (saves activation memory).
    """

    def __init__(
        self,
        c_in: int = 4,
        c_out: int = 4,
        c_r: int = 64,
        patch_size: int = 2,
        c_cond: int = 1024,
        c_hidden: Sequence[int] = (320, 640, 1280, 1280),
        nhead: Sequence[int] = (-1, 10, 20, 20),
        blocks: Sequence[int] = (4, 4, 14, 4),
        level_config: Sequence[str] = ("CT", "CTA", "CTA", "CTA"),
        inject_effnet: Sequence[bool] = (False, True, True, True),
        effnet_embd: int = 16,
        clip_embd: int = 1024,
        kernel_size: int = 3,
        dropout: float | Sequence[float] = 0.1,
        gradient_checkpointing: bool = False,
    ):
        super().__init__()
        # Hydra hands over ListConfigs; plain lists keep the config JSON-serialisable.
        c_hidden, nhead, blocks = (
            [int(c) for c in c_hidden],
            [int(n) for n in nhead],
            [int(b) for b in blocks],
        )
        level_config, inject_effnet = [str(s) for s in level_config], [bool(i) for i in inject_effnet]
        levels = len(c_hidden)
        dropouts = [float(d) for d in dropout] if isinstance(dropout, Sequence) else [float(dropout)] * levels
        _check_level_lists(levels, nhead, blocks, level_config, inject_effnet, dropouts)

        self.config = {
            "c_in": c_in,
            "c_out": c_out,
            "c_r": c_r,
            "patch_size": patch_size,
            "c_cond": c_cond,
            "c_hidden": c_hidden,
            "nhead": nhead,
            "blocks": blocks,
            "level_config": level_config,
            "inject_effnet": inject_effnet,
            "effnet_embd": effnet_embd,
            "clip_embd": clip_embd,
            "kernel_size": kernel_size,
            "dropout": dropouts if isinstance(dropout, Sequence) else float(dropout),
        }
        self.c_in, self.c_out, self.c_r, self.c_cond = c_in, c_out, c_r, c_cond
        self.patch_size = patch_size
        self.effnet_embd, self.clip_embd = effnet_embd, clip_embd
        self.gradient_checkpointing = gradient_checkpointing
        self.has_attention = any("A" in spec for spec in level_config)

        # Conditioning: CLIP tokens → c_cond (then LayerNorm); effnet → c_cond per level, down
        # levels first, then up levels (deepest first), None where a level takes no injection.
        self.clip_mapper = nn.Linear(clip_embd, c_cond)
        self.effnet_mappers = nn.ModuleList(
            [
                nn.Conv2d(effnet_embd, c_cond, kernel_size=1) if inject else None
                for inject in inject_effnet + inject_effnet[::-1]
            ]
        )
        self.seq_norm = nn.LayerNorm(c_cond, elementwise_affine=False, eps=1e-6)

        self.embedding = nn.Sequential(
            nn.PixelUnshuffle(patch_size),
            nn.Conv2d(c_in * patch_size**2, c_hidden[0], kernel_size=1),
            LayerNorm2d(c_hidden[0], elementwise_affine=False, eps=1e-6),
        )

        def block(kind: str, level: int, c_skip: int) -> nn.Module:
            c = c_hidden[level]
            if kind == "C":
                return ResBlockStageB(c, c_skip, kernel_size=kernel_size, dropout=dropouts[level])
            if kind == "A":
                return AttnBlock(c, c_cond, nhead[level], self_attn=True, dropout=dropouts[level])
            return TimestepBlock(c, c_r)

        self.down_blocks = nn.ModuleList()
        for level in range(levels):
            down = nn.ModuleList()
            if level > 0:
                down.append(
                    nn.Sequential(
                        LayerNorm2d(c_hidden[level - 1], elementwise_affine=False, eps=1e-6),
                        nn.Conv2d(c_hidden[level - 1], c_hidden[level], kernel_size=2, stride=2),
                    )
                )
            c_effnet = c_cond if inject_effnet[level] else 0
            for _ in range(blocks[level]):
                for kind in level_config[level]:
                    down.append(block(kind, level, c_effnet))
            self.down_blocks.append(down)

        self.up_blocks = nn.ModuleList()
        for level in reversed(range(levels)):
            up = nn.ModuleList()
            c_effnet = c_cond if inject_effnet[level] else 0
            for repeat in range(blocks[level]):
                for position, kind in enumerate(level_config[level]):
                    # The U-Net skip enters the level's very first block (every level but the deepest).
                    takes_unet_skip = level < levels - 1 and repeat == position == 0
                    up.append(block(kind, level, (c_hidden[level] if takes_unet_skip else 0) + c_effnet))
            if level > 0:
                up.append(
                    nn.Sequential(
                        LayerNorm2d(c_hidden[level], elementwise_affine=False, eps=1e-6),
                        nn.ConvTranspose2d(c_hidden[level], c_hidden[level - 1], kernel_size=2, stride=2),
                    )
                )
            self.up_blocks.append(up)

        # Output: a (mean-like) and b (scale-like) per latent channel; see forward.
        self.clf = nn.Sequential(
            LayerNorm2d(c_hidden[0], elementwise_affine=False, eps=1e-6),
            nn.Conv2d(c_hidden[0], 2 * c_out * patch_size**2, kernel_size=1),
            nn.PixelShuffle(patch_size),
        )
        self._init_weights(sum(blocks))

    def _init_weights(self, total_blocks: int) -> None:
        """The official v2 initialisation (as diffusers reproduces it)."""
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for mapper in self.effnet_mappers:
            if mapper is not None:
                nn.init.normal_(mapper.weight, std=0.02)
        nn.init.normal_(self.clip_mapper.weight, std=0.02)
        nn.init.xavier_uniform_(self.embedding[1].weight, gain=0.02)
        nn.init.zeros_(self.clf[1].weight)  # the network starts by predicting a = 0, b = 1/2
        for level in [*self.down_blocks, *self.up_blocks]:
            for block in level:
                if isinstance(unwrapped(block), ResBlockStageB):
                    with torch.no_grad():
                        block.channelwise[-1].weight.mul_(math.sqrt(1 / total_blocks))
                elif isinstance(unwrapped(block), TimestepBlock):
                    nn.init.zeros_(block.mapper.weight)

    # ------------------------------------------------------------------ forward

    def forward(
        self, x: torch.Tensor, r: torch.Tensor, effnet: torch.Tensor, clip: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Predict the noise ε of noised latents.

        x: ``[B, c_in, H, W]`` noised Stage A latents (H, W divisible by patch_size·2^(levels−1));
        r: ``[B]`` diffusion time in [0, 1];
        effnet: ``[B, effnet_embd, h, w]`` semantic compressor latents (any h, w; resized per level);
        clip: ``[B, L, clip_embd]`` per-token text states, or None for a network without attention.
        Returns ε̂ ``[B, c_out, H, W]`` (c_out == c_in).
        """
        self._check_inputs(x, r, effnet, clip)
        r_embed = timestep_embedding(r, self.c_r)  # [B, c_r]
        if clip is not None:
            clip = self.seq_norm(self.clip_mapper(clip))  # [B, L, c_cond]

        level_outputs = self._down_encode(self.embedding(x), r_embed, effnet, clip)
        h = self._up_decode(level_outputs, r_embed, effnet, clip)
        # DiffNeXt predicts x = a + b·ε, i.e. ε = (x − a)/b with b kept in (eps, 1 − eps).
        a, b = self.clf(h).chunk(2, dim=1)
        b = b.sigmoid() * (1 - 2 * _B_EPS) + _B_EPS
        return (x - a) / b

    def _effnet_features(self, mapper_index: int, effnet: torch.Tensor, size: torch.Size) -> torch.Tensor:
        """Compressor latents resized to one level: ``[B, effnet_embd, h, w]`` → ``[B, c_cond, *size]``."""
        # Bicubic resize in float32 (the official code does it outside autocast precision).
        resized = F.interpolate(effnet.float(), size=size, mode="bicubic", antialias=True, align_corners=True)
        return self.effnet_mappers[mapper_index](resized.to(effnet.dtype))

    def _down_encode(
        self, x: torch.Tensor, r_embed: torch.Tensor, effnet: torch.Tensor, clip: torch.Tensor | None
    ) -> list[torch.Tensor]:
        level_outputs = []
        for level, down in enumerate(self.down_blocks):
            effnet_c = None
            for block in down:
                if isinstance(unwrapped(block), ResBlockStageB):
                    if effnet_c is None and self.effnet_mappers[level] is not None:
                        effnet_c = self._effnet_features(level, effnet, x.shape[-2:])
                    x = self._run(block, x, effnet_c)
                elif isinstance(unwrapped(block), AttnBlock):
                    x = self._run(block, x, clip)
                elif isinstance(unwrapped(block), TimestepBlock):
                    x = self._run(block, x, r_embed)
                else:  # the downsampling conv
                    x = self._run(block, x)
            level_outputs.insert(0, x)
        return level_outputs  # deepest first

    def _up_decode(
        self,
        level_outputs: list[torch.Tensor],
        r_embed: torch.Tensor,
        effnet: torch.Tensor,
        clip: torch.Tensor | None,
    ) -> torch.Tensor:
        x = level_outputs[0]
        n_down = len(self.down_blocks)
        for i, up in enumerate(self.up_blocks):
            effnet_c = None
            mapper_index = n_down + i
            for j, block in enumerate(up):
                if isinstance(unwrapped(block), ResBlockStageB):
                    if effnet_c is None and self.effnet_mappers[mapper_index] is not None:
                        effnet_c = self._effnet_features(mapper_index, effnet, x.shape[-2:])
                    skip = level_outputs[i] if j == 0 and i > 0 else None
                    if effnet_c is not None:
                        skip = effnet_c if skip is None else torch.cat([skip, effnet_c], dim=1)
                    x = self._run(block, x, skip)
                elif isinstance(unwrapped(block), AttnBlock):
                    x = self._run(block, x, clip)
                elif isinstance(unwrapped(block), TimestepBlock):
                    x = self._run(block, x, r_embed)
                else:  # the upsampling transposed conv
                    x = self._run(block, x)
        return x

    def _run(self, block: nn.Module, *args: torch.Tensor | None) -> torch.Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def _check_inputs(
        self, x: torch.Tensor, r: torch.Tensor, effnet: torch.Tensor, clip: torch.Tensor | None
    ) -> None:
        if x.ndim != 4 or x.shape[1] != self.c_in:
            raise ValueError(
                f"StageB: latents x must be [B, c_in={self.c_in}, H, W], got {tuple(x.shape)}; "
                f"pass Stage A latents (divided by its scale_factor) with {self.c_in} channels"
            )
        multiple = self.patch_size * 2 ** (len(self.down_blocks) - 1)
        if x.shape[-2] % multiple or x.shape[-1] % multiple:
            raise ValueError(
                f"StageB: latent height and width must be divisible by patch_size·2^(levels−1) = {multiple}, "
                f"got {tuple(x.shape[-2:])}; crop or resize the images so the Stage A latent side is a "
                f"multiple of {multiple}"
            )
        batch = x.shape[0]
        if r.shape != (batch,):
            raise ValueError(f"StageB: r must be [B={batch}] times in [0, 1], got shape {tuple(r.shape)}")
        # With no level injecting them (inject_effnet all false, as in diffusers' own tiny test pipelines)
        # the semantic latents are never read, so their channels do not matter, as in diffusers.
        injects = any(self.config["inject_effnet"])
        if effnet.ndim != 4 or effnet.shape[0] != batch or (injects and effnet.shape[1] != self.effnet_embd):
            raise ValueError(
                f"StageB: effnet must be [B={batch}, effnet_embd={self.effnet_embd}, h, w] semantic "
                f"compressor latents, got {tuple(effnet.shape)}; check that SemanticCompressor(c_latent=...) "
                f"matches StageB(effnet_embd=...)"
            )
        if clip is None:
            if self.has_attention:
                raise ValueError(
                    "StageB: clip is None but this network has attention blocks; pass text states "
                    '[B, L, clip_embd] (embed empty captions "" for the unconditional branch)'
                )
        elif clip.ndim != 3 or clip.shape[-1] != self.clip_embd or clip.shape[0] != batch:
            raise ValueError(
                f"StageB: clip must be [B={batch}, L, clip_embd={self.clip_embd}] text states, got "
                f"{tuple(clip.shape)}; check the text encoder's width matches StageB(clip_embd=...)"
            )


def _check_level_lists(
    levels: int,
    nhead: list[int],
    blocks: list[int],
    level_config: list[str],
    inject_effnet: list[bool],
    dropouts: list[float],
) -> None:
    named = {
        "nhead": nhead,
        "blocks": blocks,
        "level_config": level_config,
        "inject_effnet": inject_effnet,
        "dropout": dropouts,
    }
    for name, values in named.items():
        if len(values) != levels:
            raise ValueError(
                f"StageB: {name} has {len(values)} entries but c_hidden has {levels} levels; "
                f"give one {name} entry per level"
            )
    for level, spec in enumerate(level_config):
        unknown = set(spec) - set(BLOCK_TYPES)
        if unknown or not spec:
            raise ValueError(
                f"StageB: level_config[{level}]={spec!r} must be a non-empty string of block letters "
                f"{sorted(BLOCK_TYPES)} (C=ResBlock, T=TimestepBlock, A=AttnBlock)"
            )
        if "A" in spec and nhead[level] <= 0:
            raise ValueError(
                f"StageB: level {level} has attention ('A' in {spec!r}) but nhead[{level}]={nhead[level]}; "
                f"give a positive head count"
            )
