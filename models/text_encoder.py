"""The frozen CLIP text encoder that conditions Stage B (CLIP-H) and Stage C (CLIP-bigG).

Only open_clip's *text tower* is built (token embedding, causal transformer, ``ln_final``,
``text_projection``): the ViT-bigG vision tower alone would be ~1.8 B parameters nobody uses here.
Weights come from an open_clip pretrained tag (downloaded by open_clip), a local open_clip
checkpoint file (full CLIP state dict; the text keys are taken), or a local open_clip model
directory (``open_clip_config.json`` + weights). Tokenising uses open_clip's ``SimpleTokenizer``,
whose BPE vocabulary ships inside the package, so no network is needed for it.

Text conditioning is computed exactly as diffusers' Würstchen pipelines compute it (REFERENCE.md
"Diffusion, as the official code does it", text conditioning): 77 tokens (start, ≤ 75 BPE tokens, end of
text), padded with ``pad_token_id`` (the tokenizer folder's own id), and the padding *keys* masked on top of
the causal mask, as transformers' ``CLIPTextModel`` does when the pipelines pass the tokenizer's
``attention_mask``. The same for captions, "" and negative prompts, in training, caching, generation and
evaluation, so an export draws the same in diffusers as here.

Outputs:
``hidden`` — per-token states after ``ln_final`` ``[B, 77, width]`` at all 77 positions (the
cross-attention sequence, unmasked);
``pooled`` — the end-of-text token's state projected by ``text_projection`` ``[B, embed_dim]``
(CLIP's text embedding; embed_dim == width for CLIP-H and CLIP-bigG).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.factory import load_state_dict
from open_clip.model import _build_text_tower
from safetensors import safe_open
from torch import nn

# A local open_clip model directory: its config file and weight files, most preferred first.
OPEN_CLIP_CONFIG_FILE = "open_clip_config.json"
OPEN_CLIP_WEIGHT_FILES = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.bin",
    "model.safetensors",
    "pytorch_model.bin",
)
# REFERENCE.md, text conditioning: the public v2 tokenizer folders (warp-ai, LAION CLIP-H) pad with
# <|endoftext|>; open_clip's own tokenizer pads with 0 ("!"), which exports made before the padding was
# configurable were trained with (models/hub/pipeline_dir.py reads those with LEGACY_PAD_TOKEN_ID).
END_OF_TEXT_TOKEN_ID = 49407
LEGACY_PAD_TOKEN_ID = 0

# Root-level keys of a CLIP state dict that belong to the text tower (the vision tower is "visual.*").
TEXT_TOWER_PREFIXES = (
    "token_embedding.",
    "positional_embedding",
    "transformer.",
    "ln_final.",
    "text_projection",
)


class TextEncoder(nn.Module):
    """Frozen open_clip text tower: captions → (per-token hidden states, pooled embedding).

    Args:
        model_name: an open_clip architecture (``ViT-bigG-14`` for Stage C, ``ViT-H-14`` for Stage B).
        pretrained: None (random init: tests, tiny runs), an open_clip tag of ``model_name``
            (``laion2b_s39b_b160k``, ``laion2b_s32b_b79k``), a local checkpoint file, or a local
            open_clip model directory.
        model_cfg: architecture instead of the built-in ``model_name`` config; either an open_clip
            model config (``{"embed_dim": .., "text_cfg": {..}}``) or a bare text config
            (``{"width": 64, "layers": 2, "heads": 2, "context_length": 77, "vocab_size": 49408}``,
            optionally with ``embed_dim`` and ``quick_gelu``).
        context_length: tokens per caption (77 for every CLIP here).
        pad_token_id: the id after the end-of-text token (the tokenizer folder's ``pad_token_id``:
            49407 ``<|endoftext|>`` for the public v2 folders, 0 ``!`` for some other CLIP folders).
    """

    def __init__(
        self,
        model_name: str = "ViT-bigG-14",
        pretrained: str | None = None,
        model_cfg: dict[str, Any] | None = None,
        context_length: int = 77,
        pad_token_id: int = END_OF_TEXT_TOKEN_ID,
    ):
        super().__init__()
        self.model_name, self.context_length = model_name, context_length
        checkpoint, tag_cfg, dir_cfg = _resolve_weights(model_name, pretrained)
        cfg = _resolve_architecture(model_name, model_cfg if model_cfg is not None else dir_cfg)
        text_cfg = dict(cfg["text_cfg"])
        if text_cfg.get("hf_model_name") or text_cfg.get("hf_tokenizer_name"):
            raise ValueError(
                f"TextEncoder: {model_name!r} uses a Hugging Face text model/tokenizer, which is not "
                f"supported (it needs the network); pick an open_clip architecture with a native text tower "
                f"(ViT-H-14, ViT-bigG-14)"
            )
        text_cfg["context_length"] = context_length
        text_cfg["output_tokens"] = True  # the tower then returns (pooled, per-token states after ln_final)
        quick_gelu = bool(cfg.get("quick_gelu", False) or tag_cfg.get("quick_gelu", False))
        self.text = _build_text_tower(cfg.get("embed_dim", text_cfg.get("width", 512)), text_cfg, quick_gelu)
        self.width: int = self.text.width

        self.tokenizer = open_clip.SimpleTokenizer(
            context_length=context_length, **(text_cfg.get("tokenizer_kwargs") or {})
        )
        if not 0 <= int(pad_token_id) < self.tokenizer.vocab_size:
            raise ValueError(
                f"TextEncoder: pad_token_id={pad_token_id} is not a token id of the CLIP BPE vocabulary "
                f"[0, {self.tokenizer.vocab_size}); use the tokenizer folder's pad_token_id "
                f"({END_OF_TEXT_TOKEN_ID} for <|endoftext|>, {LEGACY_PAD_TOKEN_ID} for '!')"
            )
        self.pad_token_id = int(pad_token_id)
        if self.text.vocab_size < self.tokenizer.vocab_size:
            raise ValueError(
                f"TextEncoder: vocab_size={self.text.vocab_size} is smaller than the CLIP BPE tokenizer's "
                f"{self.tokenizer.vocab_size} tokens; set text_cfg.vocab_size to {self.tokenizer.vocab_size}"
            )

        if checkpoint is not None:
            self._load_text_weights(checkpoint)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> TextEncoder:
        """Always eval: the encoder is frozen, whatever its parent module's mode."""
        return super().train(False)

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        """captions (B strings) → token ids ``[B, context_length]`` (long): start, ≤ context_length − 2
        BPE tokens, end of text, then ``pad_token_id`` (what a CLIPTokenizer with padding="max_length",
        truncation=True gives)."""
        if isinstance(captions, str) or not all(isinstance(c, str) for c in captions):
            raise ValueError(
                f"TextEncoder: captions must be a list of strings, got {type(captions).__name__}; wrap "
                f"a single caption as [caption]"
            )
        tokens = self.tokenizer(list(captions))  # open_clip pads with 0
        return tokens.masked_fill(~self.attention_mask(tokens).bool(), self.pad_token_id)

    def end_of_text_index(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[B]``: the position of each caption's first end-of-text token (where CLIP pools)."""
        return (tokens == self.tokenizer.eot_token_id).int().argmax(dim=-1)

    def attention_mask(self, tokens: torch.Tensor) -> torch.Tensor:
        """The tokenizer's ``attention_mask`` ``[B, L]`` (long): 1 from the start token through the first
        end-of-text token, 0 on the padding after it."""
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        return (positions[None] <= self.end_of_text_index(tokens)[:, None]).long()

    @torch.no_grad()
    def forward(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """captions (B strings) → (hidden ``[B, context_length, width]``, pooled ``[B, embed_dim]``)."""
        return self.encode_tokens(self.tokenize(captions))

    @torch.no_grad()
    def encode_tokens(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """token ids ``[B, L]`` (from :meth:`tokenize`) → (hidden ``[B, L, width]``, pooled ``[B, embed_dim]``).

        The causal mask plus the padding keys masked, as transformers' CLIPTextModel computes it with the
        tokenizer's attention mask; every query keeps the start token, so no row is fully masked.
        """
        tower = self.text
        tokens = tokens.to(tower.token_embedding.weight.device)
        length = tokens.shape[1]
        x = tower.token_embedding(tokens) + tower.positional_embedding[:length].to(tower.token_embedding.weight.dtype)
        causal = tower.attn_mask[:length, :length].to(device=x.device, dtype=x.dtype)
        padding = torch.zeros(tokens.shape, dtype=x.dtype, device=x.device).masked_fill(
            ~self.attention_mask(tokens).bool(), float("-inf")
        )
        # [B·heads, L, L], as nn.MultiheadAttention takes a per-sample mask.
        mask = (causal[None] + padding[:, None, :]).repeat_interleave(tower.heads, dim=0)
        hidden = tower.ln_final(tower.transformer(x, attn_mask=mask))
        pooled = hidden[torch.arange(hidden.shape[0], device=x.device), self.end_of_text_index(tokens)]
        projection = tower.text_projection
        if isinstance(projection, nn.Linear):
            pooled = projection(pooled)
        elif projection is not None:
            pooled = pooled @ projection
        return hidden, pooled

    def _load_text_weights(self, checkpoint: Path) -> None:
        state_dict = _read_state_dict(checkpoint)
        if any(key.startswith("text.") for key in state_dict):  # CustomTextCLIP layout
            text_state = {k[len("text.") :]: v for k, v in state_dict.items() if k.startswith("text.")}
        else:  # CLIP layout: the text tower's parameters sit at the root
            text_state = {k: v for k, v in state_dict.items() if k.startswith(TEXT_TOWER_PREFIXES)}
        text_state.pop("attn_mask", None)  # a buffer rebuilt from context_length, not a weight
        try:
            self.text.load_state_dict(text_state, strict=True)
        except RuntimeError as error:
            raise ValueError(
                f"TextEncoder: the checkpoint {checkpoint} does not fit the {self.model_name!r} text tower "
                f"(context_length={self.context_length}); check model_name/model_cfg match the checkpoint."
                f"\n{error}"
            ) from error


def _read_state_dict(checkpoint: Path) -> dict[str, torch.Tensor]:
    """A CLIP checkpoint's tensors; from safetensors only the text tower's (bigG's vision tower is ~7 GB)."""
    if checkpoint.suffix != ".safetensors":
        return load_state_dict(str(checkpoint), device="cpu", weights_only=True)
    with safe_open(str(checkpoint), framework="pt", device="cpu") as f:
        names = f.keys()  # a safe_open handle is not iterable itself
        return {k: f.get_tensor(k) for k in names if k.startswith(("text.", *TEXT_TOWER_PREFIXES))}


def _resolve_weights(model_name: str, pretrained: str | None) -> tuple[Path | None, dict, dict | None]:
    """→ (weights file or None, the open_clip tag's config, a local directory's model config or None)."""
    if pretrained is None or pretrained == "":
        return None, {}, None
    path = Path(pretrained).expanduser()
    if path.is_file():
        return path, {}, None
    if path.is_dir():
        weights = next((path / n for n in OPEN_CLIP_WEIGHT_FILES if (path / n).is_file()), None)
        if weights is None:
            raise FileNotFoundError(
                f"TextEncoder: pretrained directory {path} holds none of {list(OPEN_CLIP_WEIGHT_FILES)}; "
                f"point pretrained at the checkpoint file itself"
            )
        dir_cfg = None
        if (path / OPEN_CLIP_CONFIG_FILE).is_file():
            config = json.loads((path / OPEN_CLIP_CONFIG_FILE).read_text())
            dir_cfg = config.get("model_cfg", config)
        return weights, {}, dir_cfg
    tag_cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
    if not tag_cfg:
        raise ValueError(
            f"TextEncoder: pretrained={pretrained!r} is neither an existing local path nor an "
            f"open_clip tag of {model_name!r} "
            f"(known tags: {open_clip.list_pretrained_tags_by_model(model_name)})"
        )
    # open_clip downloads (Hugging Face Hub) and caches; offline, pass a local path instead.
    return Path(open_clip.download_pretrained(tag_cfg)), tag_cfg, None


def _resolve_architecture(model_name: str, model_cfg: dict[str, Any] | None) -> dict[str, Any]:
    """→ an open_clip model config with at least ``text_cfg`` (and usually ``embed_dim``)."""
    if model_cfg is None:
        cfg = open_clip.get_model_config(model_name)
        if cfg is None:
            raise ValueError(
                f"TextEncoder: {model_name!r} is not an open_clip architecture; use one of "
                f"open_clip.list_models() (e.g. ViT-H-14, ViT-bigG-14) or pass model_cfg"
            )
        return cfg
    model_cfg = dict(model_cfg)  # also turns an OmegaConf DictConfig's top level into a dict
    if "text_cfg" in model_cfg:
        return {**model_cfg, "text_cfg": dict(model_cfg["text_cfg"])}
    extra = {k: model_cfg.pop(k) for k in ("embed_dim", "quick_gelu") if k in model_cfg}
    if "width" not in model_cfg:
        raise ValueError(
            f"TextEncoder: model_cfg needs a 'text_cfg' entry or text tower keys (width, layers, heads, "
            f"...), got keys {sorted(model_cfg)}"
        )
    return {
        "embed_dim": extra.get("embed_dim", model_cfg["width"]),
        "quick_gelu": extra.get("quick_gelu", False),
        "text_cfg": model_cfg,
    }
