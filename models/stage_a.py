"""Stage A: the f4 VQGAN of Würstchen v2 (paper §3, "Stage A"; REFERENCE.md "The cascade").

An image ``[B, 3, H, W]`` in [0, 1] is patched (PixelUnshuffle) and encoded to a 4-channel latent at
``H/4 × W/4``, normalised by a BatchNorm so that latents have roughly zero mean and unit variance. A
codebook of ``num_vq_embeddings × latent_channels`` (8,192 × 4 in v2) quantizes the latent while Stage A
is trained; Stage B later models the *continuous* latent ("quantization dropped for B", REFERENCE.md
"Training recipe"), so ``decode`` skips the quantizer unless asked.

Module names equal diffusers' ``PaellaVQModel`` (codebook at ``vquantizer.embedding.weight``) so that the
public v2 VQGAN weights load without a key map.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from wurst.models.common import LayerNorm2d


class MixingResidualBlock(nn.Module):
    """Paella's residual block: depthwise 3×3 mixing, then a channel MLP, each behind a LayerNorm.

    Six learned scalars (``gammas``) modulate the two norms (scale, shift) and gate the two residual
    branches; they start at zero so that a fresh block is the identity.
    """

    def __init__(self, c: int, c_hidden: int):
        super().__init__()
        self.norm1 = LayerNorm2d(c, elementwise_affine=False, eps=1e-6)
        # Replication padding rather than zeros: no dark border artefacts in reconstructions.
        self.depthwise = nn.Sequential(nn.ReplicationPad2d(1), nn.Conv2d(c, c, kernel_size=3, groups=c))
        self.norm2 = LayerNorm2d(c, elementwise_affine=False, eps=1e-6)
        self.channelwise = nn.Sequential(nn.Linear(c, c_hidden), nn.GELU(), nn.Linear(c_hidden, c))
        self.gammas = nn.Parameter(torch.zeros(6))
        # As the authors' VQGAN code initialises these blocks.
        for layer in (self.depthwise[1], self.channelwise[0], self.channelwise[2]):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``[B, c, H, W]`` → ``[B, c, H, W]``."""
        g = self.gammas
        x = x + self.depthwise(self.norm1(x) * (1 + g[0]) + g[1]) * g[2]
        mixed = self.norm2(x) * (1 + g[3]) + g[4]
        return x + self.channelwise(mixed.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) * g[5]


class VectorQuantizer(nn.Module):
    """Nearest-code quantizer with a straight-through gradient (VQ-VAE, van den Oord et al. 2017).

    The codebook lives at ``embedding.weight`` ``[num_vq_embeddings, latent_channels]``.
    """

    def __init__(self, num_vq_embeddings: int, latent_channels: int, beta: float = 0.25):
        super().__init__()
        self.beta = beta
        self.embedding = nn.Embedding(num_vq_embeddings, latent_channels)
        # The latents the codes must match come out of a BatchNorm (zero mean, unit variance), so the codes
        # start from that same distribution. The authors' code starts them at U(-1/K, 1/K) near the origin,
        # but Stage A's training is unpublished (REFERENCE.md) and near-zero codes make the first decodes
        # near-constant: on the tiny overfit test reconstruction falls 3.6× in 60 steps instead of > 4×.
        nn.init.normal_(self.embedding.weight)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z: ``[B, C, h, w]`` → (quantized ``[B, C, h, w]``, vq_loss scalar, indices ``[B, h, w]``)."""
        b, c, h, w = z.shape
        z_flat = z.permute(0, 2, 3, 1).reshape(-1, c)  # [B*h*w, C]
        indices = torch.cdist(z_flat, self.embedding.weight).argmin(dim=1)  # nearest code by L2
        q = self.embedding(indices).view(b, h, w, c).permute(0, 3, 1, 2)
        # Codebook term pulls codes to the encoder output; commitment term (× beta) keeps the encoder
        # near its codes (VQ-VAE eq. 3).
        vq_loss = F.mse_loss(q, z.detach()) + self.beta * F.mse_loss(q.detach(), z)
        # Straight-through estimator: the forward value is the code, the gradient reaches z unchanged.
        quantized = z + (q - z).detach()
        return quantized, vq_loss, indices.view(b, h, w)


def codebook_usage(indices: torch.Tensor, num_vq_embeddings: int) -> tuple[torch.Tensor, torch.Tensor]:
    """How well a batch of code indices uses the codebook.

    Args:
        indices: code indices of any shape, e.g. ``[B, h, w]``.
        num_vq_embeddings: codebook size.
    Returns:
        (perplexity, dead_fraction): ``exp`` of the entropy of the code histogram (equals the number of
        codes in use when they are used uniformly; at most ``num_vq_embeddings``), and the fraction of
        codes never chosen in ``indices``.
    """
    if indices.numel() == 0:
        raise ValueError("codebook_usage got empty indices; pass the [B, h, w] indices of at least one image")
    if indices.dtype.is_floating_point or indices.min() < 0 or indices.max() >= num_vq_embeddings:
        raise ValueError(
            f"codebook_usage indices must be integers in [0, {num_vq_embeddings}); got dtype {indices.dtype}, "
            f"range [{indices.min().item()}, {indices.max().item()}]; pass the indices returned by quantize"
        )
    counts = torch.bincount(indices.flatten().long(), minlength=num_vq_embeddings).float()
    p = counts / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return entropy.exp(), (counts == 0).float().mean()


class StageA(nn.Module):
    """The f4 VQGAN: ``encode`` → ``quantize`` → ``decode``.

    Args:
        in_channels, out_channels: image channels (3).
        up_down_scale_factor: PixelUnshuffle/PixelShuffle factor of the patching (2).
        levels: resolution levels; each one after the first halves the size once more (2 → f4).
        bottleneck_blocks: MixingResidualBlocks at the decoder's lowest level (12).
        embed_dim: channels at the lowest level; level i has ``embed_dim / 2**(levels-1-i)`` (384).
        latent_channels: channels of the latent (4).
        num_vq_embeddings: codebook size (8,192).
        scale_factor: Stage B models ``latent / scale_factor``; Stage A decodes ``scale_factor · ℓ``
            (0.3764, REFERENCE.md "Hand-offs").
        beta: weight of the commitment term in the VQ loss (0.25).
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        up_down_scale_factor: int = 2,
        levels: int = 2,
        bottleneck_blocks: int = 12,
        embed_dim: int = 384,
        latent_channels: int = 4,
        num_vq_embeddings: int = 8192,
        scale_factor: float = 0.3764,
        beta: float = 0.25,
    ):
        super().__init__()
        if embed_dim % 2 ** (levels - 1) != 0:
            raise ValueError(
                f"StageA embed_dim={embed_dim} must be divisible by 2**(levels-1)={2 ** (levels - 1)}, "
                "the channel halving per level; pick a multiple"
            )
        # The constructor kwargs, for export/config.json and the diffusers converters.
        self.config = {
            "in_channels": in_channels,
            "out_channels": out_channels,
            "up_down_scale_factor": up_down_scale_factor,
            "levels": levels,
            "bottleneck_blocks": bottleneck_blocks,
            "embed_dim": embed_dim,
            "latent_channels": latent_channels,
            "num_vq_embeddings": num_vq_embeddings,
            "scale_factor": scale_factor,
            "beta": beta,
        }
        self.in_channels, self.latent_channels = in_channels, latent_channels
        self.num_vq_embeddings = num_vq_embeddings
        self.scale_factor = scale_factor
        # Total spatial reduction: the patching, then one stride-2 conv per extra level (2 · 2 = 4 in v2).
        self.downscale = up_down_scale_factor * 2 ** (levels - 1)
        c_levels = [embed_dim // 2**i for i in reversed(range(levels))]  # e.g. [192, 384]

        # Encoder: patching, then per level (downsample, MixingResidualBlock), then the 1×1 projection to
        # the latent with a BatchNorm that keeps latents at unit scale for the quantizer and Stage B.
        self.in_block = nn.Sequential(
            nn.PixelUnshuffle(up_down_scale_factor),
            nn.Conv2d(in_channels * up_down_scale_factor**2, c_levels[0], kernel_size=1),
        )
        down: list[nn.Module] = []
        for i, c in enumerate(c_levels):
            if i > 0:
                down.append(nn.Conv2d(c_levels[i - 1], c, kernel_size=4, stride=2, padding=1))
            down.append(MixingResidualBlock(c, c * 4))
        down.append(
            nn.Sequential(
                nn.Conv2d(c_levels[-1], latent_channels, 1, bias=False), nn.BatchNorm2d(latent_channels)
            )
        )
        self.down_blocks = nn.Sequential(*down)

        self.vquantizer = VectorQuantizer(num_vq_embeddings, latent_channels, beta=beta)

        # Decoder: mirror of the encoder, with the extra capacity in the bottleneck blocks at the lowest level.
        up: list[nn.Module] = [nn.Sequential(nn.Conv2d(latent_channels, c_levels[-1], kernel_size=1))]
        for i, c in enumerate(reversed(c_levels)):
            up.extend(MixingResidualBlock(c, c * 4) for _ in range(bottleneck_blocks if i == 0 else 1))
            if i < levels - 1:
                up.append(nn.ConvTranspose2d(c, c_levels[levels - 2 - i], kernel_size=4, stride=2, padding=1))
        self.up_blocks = nn.Sequential(*up)
        self.out_block = nn.Sequential(
            nn.Conv2d(c_levels[0], out_channels * up_down_scale_factor**2, kernel_size=1),
            nn.PixelShuffle(up_down_scale_factor),
        )

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` in [0, 1] → continuous latents ``[B, 4, H/4, W/4]`` (before quantization)."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"StageA.encode got images of shape {tuple(x.shape)}; expected [B, {self.in_channels}, H, W] "
                "(RGB in [0, 1]); convert grayscale/RGBA images to RGB first"
            )
        if x.shape[-2] % self.downscale or x.shape[-1] % self.downscale:
            raise ValueError(
                f"StageA.encode got images of size {x.shape[-2]}×{x.shape[-1]}; height and width must be "
                f"divisible by {self.downscale} (the patching and downsampling); resize or crop to a multiple"
            )
        return self.down_blocks(self.in_block(x))

    def quantize(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Latents ``[B, 4, h, w]`` → (quantized ``[B, 4, h, w]`` (straight-through), vq_loss, indices ``[B, h, w]``)."""
        self._check_latents(latents, "quantize")
        return self.vquantizer(latents)

    def decode(self, latents: torch.Tensor, quantize: bool = False) -> torch.Tensor:
        """Latents ``[B, 4, h, w]`` → images ``[B, 3, 4h, 4w]``; ``quantize`` snaps them to the codebook first."""
        self._check_latents(latents, "decode")
        if quantize:
            latents = self.vquantizer(latents)[0]
        return self.out_block(self.up_blocks(latents))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Images ``[B, 3, H, W]`` → (reconstruction ``[B, 3, H, W]``, vq_loss, indices ``[B, H/4, W/4]``)."""
        quantized, vq_loss, indices = self.quantize(self.encode(x))
        return self.decode(quantized), vq_loss, indices

    def codebook_usage(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(perplexity, dead_fraction) of ``indices`` over this model's codebook; see ``codebook_usage``."""
        return codebook_usage(indices, self.num_vq_embeddings)

    def _check_latents(self, latents: torch.Tensor, method: str) -> None:
        if latents.ndim != 4 or latents.shape[1] != self.latent_channels:
            raise ValueError(
                f"StageA.{method} got latents of shape {tuple(latents.shape)}; expected "
                f"[B, {self.latent_channels}, h, w] (latent_channels); pass the output of StageA.encode "
                "(Stage B samples are multiplied by scale_factor first)"
            )
