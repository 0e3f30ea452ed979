"""Tiny, randomly initialised cascades for the diffusion tests (CPU, offline).

The stages are diffusers' Würstchen classes (the public layout our StageA/B/C match); the text
encoders are tiny transformers CLIP text models behind a tokenizer built from a hand-written
vocabulary, wrapped to the contract's ``captions -> (hidden, pooled)`` signature.
"""

from __future__ import annotations

import string

import pytest
import torch
from diffusers import DDPMWuerstchenScheduler, WuerstchenDecoderPipeline, WuerstchenPriorPipeline
from diffusers.pipelines.deprecated.wuerstchen import PaellaVQModel, WuerstchenDiffNeXt, WuerstchenPrior
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from wurst.models.cascade import CascadeSampler

TEXT_WIDTH = 64  # conf/model/text_encoder/tiny.yaml: width 64 for both stages
IMAGE_SIDE = 128  # tiny cascade: Stage C latent 16×3×3, Stage B latent 4×32×32


def tiny_tokenizer() -> CLIPTokenizer:
    """A CLIP BPE tokenizer over lowercase letters plus two merges; enough for short test captions."""
    vocab: dict[str, int] = {}
    for suffix in ("", "</w>"):
        for letter in string.ascii_lowercase:
            vocab[letter + suffix] = len(vocab)
    for token in ("th", "the</w>", "<|startoftext|>", "<|endoftext|>"):
        vocab[token] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[("t", "h"), ("th", "e</w>")], model_max_length=77)


def randomise(module: torch.nn.Module, seed: int, std: float = 0.2) -> torch.nn.Module:
    """Replace every parameter with seeded noise: diffusers zero-initialises output and time layers,
    which would make the tiny networks ignore their inputs and the comparisons vacuous."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
    return module.eval()


class HFTextEncoder:
    """A transformers CLIP text model + tokenizer with the contract's text-encoder signature,
    tokenising exactly as diffusers' Würstchen pipelines do (pad to 77, attention mask)."""

    def __init__(self, tokenizer: CLIPTokenizer, model: CLIPTextModel):
        self.tokenizer, self.model = tokenizer, model
        self.width = model.config.hidden_size

    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.tokenizer(
            captions,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        output = self.model(tokens.input_ids, attention_mask=tokens.attention_mask)
        return output.last_hidden_state, output.pooler_output


def tiny_text_model(seed: int, width: int = TEXT_WIDTH) -> CLIPTextModel:
    tokenizer = tiny_tokenizer()
    config = CLIPTextConfig(
        vocab_size=len(tokenizer.get_vocab()),
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return CLIPTextModel(config).eval()


@pytest.fixture(scope="session")
def tiny_diffusers_stages() -> dict[str, torch.nn.Module]:
    """Tiny diffusers Stage C / B / A and two text encoders, randomly initialised with fixed seeds.

    The noise levels of the weights keep z, Stage B latents and pixels in a sane range, so that
    only ~2% of the decoded pixels hit the [0, 1] clamp and comparisons see real values.
    """
    prior = randomise(
        WuerstchenPrior(c_in=16, c=32, c_cond=TEXT_WIDTH, c_r=64, depth=2, nhead=2), seed=1, std=0.02
    )
    decoder = randomise(
        WuerstchenDiffNeXt(
            c_in=4,
            c_out=4,
            c_r=64,
            patch_size=2,
            c_cond=32,
            c_hidden=[16, 32],
            nhead=[-1, 2],
            blocks=[1, 1],
            level_config=["CT", "CTA"],
            inject_effnet=[False, True],
            effnet_embd=16,
            clip_embd=TEXT_WIDTH,
        ),
        seed=2,
        std=0.05,
    )
    vqgan = randomise(
        PaellaVQModel(levels=2, bottleneck_blocks=1, embed_dim=16, latent_channels=4, num_vq_embeddings=32),
        seed=3,
        std=0.05,
    )
    with torch.no_grad():
        vqgan.out_block[0].bias.fill_(0.5)  # centre the pixels in [0, 1]
    return {
        "prior": prior,
        "decoder": decoder,
        "vqgan": vqgan,
        "text_model_c": tiny_text_model(seed=4),
        "text_model_b": tiny_text_model(seed=5),
    }


@pytest.fixture(scope="session")
def diffusers_pipelines(tiny_diffusers_stages) -> tuple[WuerstchenPriorPipeline, WuerstchenDecoderPipeline]:
    """The public v2 prior and decoder pipelines around the tiny stages."""
    s = tiny_diffusers_stages
    prior_pipe = WuerstchenPriorPipeline(
        tokenizer=tiny_tokenizer(),
        text_encoder=s["text_model_c"],
        prior=s["prior"],
        scheduler=DDPMWuerstchenScheduler(),
    )
    decoder_pipe = WuerstchenDecoderPipeline(
        tokenizer=tiny_tokenizer(),
        text_encoder=s["text_model_b"],
        decoder=s["decoder"],
        scheduler=DDPMWuerstchenScheduler(),
        vqgan=s["vqgan"],
    )
    for pipe in (prior_pipe, decoder_pipe):
        pipe.set_progress_bar_config(disable=True)
    return prior_pipe, decoder_pipe


@pytest.fixture(scope="session")
def make_cascade(tiny_diffusers_stages):
    """Build a CascadeSampler over the tiny stages; keyword arguments override sampler settings."""
    s = tiny_diffusers_stages
    text_c = HFTextEncoder(tiny_tokenizer(), s["text_model_c"])
    text_b = HFTextEncoder(tiny_tokenizer(), s["text_model_b"])

    def build(**settings) -> CascadeSampler:
        defaults = {"prior_t_grid": "linear", "prior_steps": 3, "decoder_steps": 2}
        return CascadeSampler(
            stage_c=s["prior"],
            stage_b=s["decoder"],
            stage_a=s["vqgan"],
            text_encoder_c=text_c,
            text_encoder_b=text_b,
            **{**defaults, **settings},
        )

    return build


@pytest.fixture(scope="session")
def make_text_encoder():
    """A fresh tiny CLIP text encoder with the contract's signature: ``make_text_encoder(seed, width)``."""

    def build(seed: int, width: int = TEXT_WIDTH) -> HFTextEncoder:
        return HFTextEncoder(tiny_tokenizer(), tiny_text_model(seed, width))

    return build
