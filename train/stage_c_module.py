"""Stage C: the text-conditional prior on frozen semantic-compressor latents (paper §3, Stage C).

Targets are the compressor's BatchNorm output z mapped to the v2 normalised space (z + 1) / 42
(REFERENCE.md hand-offs); the compressor comes frozen from Stage B's export. Text conditioning is
CLIP-bigG per-token hidden states; 5% of batches see the empty caption instead (classifier-free
guidance dropout). Batches either carry images (``compressor_images``) or cached encoder outputs
(``compressor_latents`` and ``text_hidden``, written by ``wurst-data cache``).

Trained from a cache (``text_from_cache``: ``data=cached``) the text encoder is not built at all: the
batches carry the text states, caption dropout takes the cache's own empty-caption states
(``text_hidden_empty.npy``), and only the previews and the export load the encoder that made the cache
(its record in the cache folder), lazily, outside the trained module.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from wurst.data.latent_cache import (
    TEXT_ENCODER_CONFIG,
    TEXT_ENCODER_WEIGHTS,
    cache_folder,
    read_empty_text_states,
)
from wurst.train.diffusion_module import DiffusionStageModule
from wurst.train.export import load_network, require_export
from wurst.train.global_stats import global_mean_std
from wurst.train.networks import instantiate_network, network_config

log = logging.getLogger(__name__)


class StageCModule(DiffusionStageModule):
    def __init__(
        self,
        network: Mapping[str, Any],
        text_encoder: Mapping[str, Any],
        optim: Mapping[str, Any],
        ema: Mapping[str, Any] | None,
        diffusion: Mapping[str, Any],
        compressor_export: str | None = None,
        text_from_cache: bool = False,
        cache_shards: str | Sequence[str] | None = None,
        text_dropout: float = 0.05,
        latent_mean: float = 42.0,
        latent_std: float = 1.0,
        measure_latent_stats: bool = False,
        seed: int = 0,
        log_every: int = 10,
        max_bad_steps: int = 20,
        preview_sampler: str = "tiny",
        preview_size: int = 128,
    ):
        super().__init__(
            optim=optim, ema=ema, diffusion=diffusion, log_every=log_every, seed=seed, max_bad_steps=max_bad_steps
        )
        self.save_hyperparameters()
        # Hand-off checks first: a missing compressor stops us before any network is built.
        self.compressor = None
        if compressor_export is not None:
            require_export(compressor_export, "b", name="compressor", why="Stage C trains on its frozen compressor")
            self.compressor = load_network(Path(compressor_export), "compressor").eval().requires_grad_(False)
        self.text_from_cache = bool(text_from_cache)
        self.text_encoder = None
        self._text_encoder_config = dict(text_encoder)
        self._cached_encoder: list = []  # text_from_cache: built on first use; in a list, so not a submodule
        if self.text_from_cache:
            # The cache's "" states: fp16 like its per-sample states; not in checkpoints (the cache has them).
            self.cache_dir = cache_folder(cache_shards)
            self.register_buffer("empty_text", read_empty_text_states(self.cache_dir), persistent=False)
        else:
            self.text_encoder = instantiate_network(text_encoder)
            self.text_encoder.eval().requires_grad_(False)
        self.network = instantiate_network(network)
        self.text_dropout = float(text_dropout)
        # The hand-off z = latent_mean·x − latent_std (REFERENCE.md: 42 and 1 for the public v2
        # compressor). With measure_latent_stats, a freshly trained compressor's own statistics are
        # used instead (set from the first batch, then fixed), so Stage C models unit-variance x.
        self.measure_latent_stats = bool(measure_latent_stats)
        self.preview_sampler, self.preview_size = str(preview_sampler), int(preview_size)
        self.register_buffer("hand_off", torch.tensor([float(latent_mean), float(latent_std)]))
        self.register_buffer("hand_off_measured", torch.zeros((), dtype=torch.bool))
        self.compressor_export = compressor_export
        self.init_ema()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        if self.text_from_cache:
            # A checkpoint of a run that still held the frozen text encoder (older versions, or the same
            # phase trained on images): its weights are not part of a cached run's state.
            state = checkpoint.get("state_dict", {})
            for key in [k for k in state if k.startswith("text_encoder.")]:
                del state[key]

    def train(self, mode: bool = True):
        super().train(mode)
        # Frozen encoders stay in eval mode (BatchNorm statistics, dropout).
        for frozen in (self.compressor, self.text_encoder):
            if frozen is not None:
                frozen.eval()
        return self

    @property
    def latent_mean(self) -> float:
        return float(self.hand_off[0])

    @property
    def latent_std(self) -> float:
        return float(self.hand_off[1])

    def latents_to_target(self, z: torch.Tensor) -> torch.Tensor:
        """Compressor output z → the space Stage C models: (z + latent_std) / latent_mean."""
        if self.measure_latent_stats and not bool(self.hand_off_measured):
            mean, std = global_mean_std(z)  # of the global batch: every DDP rank keeps the same hand-off
            with torch.no_grad():
                self.hand_off.copy_(torch.stack([std, -mean]))
                self.hand_off_measured.fill_(True)
        return (z + self.hand_off[1]) / self.hand_off[0]

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> torch.Tensor:
        return self.text_encoder(captions)[0]

    def diffusion_inputs(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, dict[str, Any], int]:
        if "compressor_latents" in batch:
            z = batch["compressor_latents"].float()
        elif "compressor_images" in batch or "images" in batch:
            if self.compressor is None:
                raise RuntimeError(
                    "Stage C got images but has no compressor: set stage.compressor_export to a Stage B "
                    "export (wurst-train stage=b) or train from cached shards (wurst-data cache)"
                )
            # Stage C's data runs at the compressor's resolution only (no full-size images needed).
            images = batch["compressor_images"] if "compressor_images" in batch else batch["images"]
            with torch.no_grad():
                z = self.compressor(images).float()
        else:
            raise KeyError("a Stage C batch needs 'compressor_latents' (cached shards) or 'compressor_images'")
        batch_size = z.shape[0]
        drop = torch.rand(()).item() < self.text_dropout  # per batch; the RNG is seeded per step
        captions = list(batch["captions"])
        if self.text_from_cache and "text_hidden" not in batch:
            raise KeyError("Stage C trains from a latent cache (text_from_cache) but the batch has no "
                           "'text_hidden'; point data.shards at `wurst-data cache` output (data=cached)")
        if drop and self.text_from_cache:
            text = self.empty_text.float().expand(batch_size, -1, -1).clone()
        elif drop:
            text = self.encode_text([""] * batch_size)
        elif "text_hidden" in batch:
            text = batch["text_hidden"].float()
        else:
            text = self.encode_text(captions)
        x0 = self.latents_to_target(z)
        return x0, {"c": text.to(x0.dtype)}, batch_size

    def export_files(self) -> dict[str, Any]:
        """``hand_off.json``: the constants the cascade maps Stage C samples to Stage B with."""
        files = {"hand_off.json": {"latent_mean": self.latent_mean, "latent_std": self.latent_std}}
        if self.text_from_cache and not self._cached_encoder_needs_weights():
            # A pretrained encoder: its name/path, as the export writes it for an encoder it holds.
            files[TEXT_ENCODER_CONFIG] = self._cached_text_encoder_config()
        return files

    def export_networks(self) -> dict[str, Any]:
        """From a cache of a randomly initialised (tiny) encoder: that encoder's weights travel with the
        export, so the cascade draws with the encoder Stage C's text states came from."""
        if self.text_from_cache and self._cached_encoder_needs_weights():
            return {"text_encoder": (self.cached_text_encoder(), self._cached_text_encoder_config())}
        return {}

    def _cached_text_encoder_config(self) -> dict[str, Any]:
        """The encoder that made the cache: its record in the cache folder (``wurst-data cache`` writes
        it), else (a cache written without one) this stage's ``text_encoder`` config."""
        record = self.cache_dir / TEXT_ENCODER_CONFIG
        return json.loads(record.read_text()) if record.is_file() else network_config(self._text_encoder_config)

    def _cached_encoder_needs_weights(self) -> bool:
        return (self.cache_dir / TEXT_ENCODER_WEIGHTS).is_file() or not self._cached_text_encoder_config().get(
            "pretrained"
        )

    def cached_text_encoder(self) -> torch.nn.Module:
        """The cache's text encoder, for previews and the export only: built on first use, then kept
        outside the module's submodules (no checkpoint, optimiser or DDP sees it)."""
        if not self._cached_encoder:
            if (self.cache_dir / TEXT_ENCODER_CONFIG).is_file():
                from wurst.train.cascade_loading import load_text_encoder

                encoder = load_text_encoder(self.cache_dir)
            else:
                log.warning("%s has no %s; previews and the export use stage.module.text_encoder, which may "
                            "not be the encoder that made the cache", self.cache_dir, TEXT_ENCODER_CONFIG)
                encoder = instantiate_network(self._text_encoder_config)
            self._cached_encoder.append(encoder.eval().requires_grad_(False).to(self.empty_text.device))
        return self._cached_encoder[0]

    @torch.no_grad()
    def preview(self, batch: Mapping[str, Any], prompts: list[str]) -> torch.Tensor | None:
        """Cascade samples for ``prompts`` through this Stage C and the pipeline's Stage B and A."""
        if self.compressor_export is None:
            return None
        pipeline_dir = Path(self.compressor_export).parent.parent
        if not (pipeline_dir / "stage_a" / "export" / "model.safetensors").is_file():
            return None
        from wurst.train.cascade_loading import load_cascade

        cascade = load_cascade(pipeline_dir, sampler=self.preview_sampler, stage_c=self.export_network(),
                               text_encoder_c=self.text_encoder if self.text_encoder is not None
                               else self.cached_text_encoder(), progress=False,
                               hand_off={"latent_mean": self.latent_mean, "latent_std": self.latent_std},
                               prior_schedule_s=self.diffusion.s)
        size = self.preview_size
        generators = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
        return cascade(prompts, size, size, generator=generators)
