"""open_clip text tower ↔ transformers ``CLIPTextModel``: the text encoders of the diffusers layout.

Our ``TextEncoder`` (models/text_encoder.py) runs open_clip's text tower; diffusers' Würstchen pipelines
hold a transformers ``CLIPTextModel`` in ``text_encoder/`` (CLIP-H, Stage B) and ``prior_text_encoder/``
(CLIP-bigG, Stage C). The two are the same network under different names:

| open_clip (``TextEncoder.text``)                 | transformers (``text_model.`` prefix)              |
|--------------------------------------------------|----------------------------------------------------|
| token_embedding.weight                           | embeddings.token_embedding.weight                  |
| positional_embedding                             | embeddings.position_embedding.weight               |
| transformer.resblocks.i.ln_1 / ln_2              | encoder.layers.i.layer_norm1 / layer_norm2         |
| transformer.resblocks.i.attn.in_proj_{weight,bias} (q; k; v stacked) | encoder.layers.i.self_attn.{q,k,v}_proj |
| transformer.resblocks.i.attn.out_proj            | encoder.layers.i.self_attn.out_proj                |
| transformer.resblocks.i.mlp.c_fc / c_proj        | encoder.layers.i.mlp.fc1 / fc2                     |
| ln_final                                         | final_layer_norm                                   |
| text_projection ``[width, embed_dim]`` (x @ P)   | text_projection.weight ``[embed_dim, width]`` (WithProjection only) |

Activation: open_clip's ``QuickGELU`` ↔ ``hidden_act="quick_gelu"`` (OpenAI CLIP), ``nn.GELU`` ↔ ``"gelu"``
(LAION's ViT-H/bigG). Both use a causal mask and pool the end-of-text token (the largest id, 49407).

Text conditioning: diffusers' Würstchen pipelines pass the tokenizer's ``attention_mask``, so transformers
masks the padding keys on top of the causal mask; our ``TextEncoder`` computes the same (its
``encode_tokens``), with the same padding id (``TextEncoder.pad_token_id`` ↔ the tokenizer folder's
``pad_token_id``), so states agree at all 77 positions.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from open_clip.transformer import QuickGELU, ResidualAttentionBlock
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from wurst.models.text_encoder import TextEncoder

# CLIP's BPE special tokens (open_clip's SimpleTokenizer and transformers' CLIPTokenizer agree on ids).
BOS_TOKEN_ID = 49406
EOS_TOKEN_ID = 49407
TRANSFORMERS_PREFIX = "text_model."
# The file a diffusers-layout text encoder folder keeps the pooled projection in: the pipelines load a
# CLIPTextModel (no projection), so the projection rides beside it for a lossless way back.
TEXT_PROJECTION_FILE = "text_projection.safetensors"


def _tower(text_encoder: TextEncoder | nn.Module) -> nn.Module:
    return text_encoder.text if isinstance(text_encoder, TextEncoder) else text_encoder


def _activation_name(block: ResidualAttentionBlock) -> str:
    act = block.mlp.gelu
    if isinstance(act, QuickGELU):
        return "quick_gelu"
    if isinstance(act, nn.GELU):
        return "gelu" if act.approximate == "none" else "gelu_pytorch_tanh"
    raise ValueError(
        f"text encoder activation {type(act).__name__} has no transformers CLIP counterpart; only GELU "
        "(LAION ViT-H/bigG) and QuickGELU (OpenAI CLIP) convert"
    )


def check_convertible(text_encoder: TextEncoder | nn.Module) -> None:
    """Raise ``ValueError`` when the open_clip tower uses a feature transformers' CLIP text model lacks."""
    tower = _tower(text_encoder)
    problems = []
    if getattr(tower, "cls_emb", None) is not None:
        problems.append("a CLS embedding (CoCa-style towers)")
    if getattr(tower, "attn_mask", None) is None:
        problems.append("no causal mask (bidirectional text tower)")
    if getattr(tower, "pool_type", "argmax") not in ("argmax", "eos"):
        problems.append(f"pool_type={tower.pool_type!r} (CLIP pools the end-of-text token)")
    if isinstance(getattr(tower, "text_projection", None), nn.Linear):
        problems.append("a Linear text projection (CLIP uses a bias-free matrix)")
    for index, block in enumerate(tower.transformer.resblocks):
        if not isinstance(block, ResidualAttentionBlock) or not isinstance(block.attn, nn.MultiheadAttention):
            problems.append(f"block {index} is {type(block).__name__}, not a plain ResidualAttentionBlock")
            break
        if not isinstance(block.ls_1, nn.Identity) or not isinstance(block.ls_2, nn.Identity):
            problems.append("layer scale (ls_init_value)")
            break
    norms = [tower.ln_final] + [m for b in tower.transformer.resblocks for m in (b.ln_1, b.ln_2)]
    if any(not isinstance(n, nn.LayerNorm) or n.eps != norms[0].eps for n in norms):
        problems.append("layer norms of different kinds or eps")
    if problems:
        raise ValueError(
            "the text encoder cannot be converted to a transformers CLIPTextModel: it has "
            + "; ".join(problems)
            + ". Use an open_clip architecture with a plain CLIP text tower (ViT-H-14, ViT-bigG-14)"
        )


def clip_text_config(text_encoder: TextEncoder, pad_token_id: int | None = None) -> CLIPTextConfig:
    """The transformers ``CLIPTextConfig`` of our text encoder's tower (same sizes, activation, eps, padding id)."""
    if pad_token_id is None:
        pad_token_id = text_encoder.pad_token_id
    check_convertible(text_encoder)
    tower = _tower(text_encoder)
    block = tower.transformer.resblocks[0]
    width = tower.width
    projection = tower.text_projection
    return CLIPTextConfig(
        vocab_size=tower.vocab_size,
        hidden_size=width,
        intermediate_size=block.mlp.c_fc.out_features,
        projection_dim=int(projection.shape[1]) if projection is not None else width,
        num_hidden_layers=len(tower.transformer.resblocks),
        num_attention_heads=tower.heads,
        max_position_embeddings=tower.positional_embedding.shape[0],
        hidden_act=_activation_name(block),
        layer_norm_eps=tower.ln_final.eps,
        attention_dropout=0.0,
        bos_token_id=BOS_TOKEN_ID,
        eos_token_id=EOS_TOKEN_ID,  # not 2: transformers then pools the first end-of-text token
        pad_token_id=pad_token_id,
    )


def to_transformers_state_dict(text_encoder: TextEncoder | nn.Module) -> dict[str, torch.Tensor]:
    """The tower's weights under ``CLIPTextModelWithProjection`` names (``text_model.*`` + ``text_projection.weight``).

    ``text_model.*`` is the layout of the public Hub folders; both transformers 4 and 5 load it into a
    ``CLIPTextModel``. ``text_projection.weight`` is present when the tower has a projection.
    """
    check_convertible(text_encoder)
    tower = _tower(text_encoder)
    out: dict[str, torch.Tensor] = {}
    p = TRANSFORMERS_PREFIX

    def put(name: str, tensor: torch.Tensor) -> None:
        out[name] = tensor.detach().clone().contiguous()

    put(f"{p}embeddings.token_embedding.weight", tower.token_embedding.weight)
    put(f"{p}embeddings.position_embedding.weight", tower.positional_embedding)
    for i, block in enumerate(tower.transformer.resblocks):
        layer = f"{p}encoder.layers.{i}."
        # nn.MultiheadAttention stacks the query, key and value projections along the output dimension.
        for part, weight, bias in zip(
            ("q", "k", "v"),
            block.attn.in_proj_weight.chunk(3, dim=0),
            block.attn.in_proj_bias.chunk(3, dim=0),
        ):
            put(f"{layer}self_attn.{part}_proj.weight", weight)
            put(f"{layer}self_attn.{part}_proj.bias", bias)
        put(f"{layer}self_attn.out_proj.weight", block.attn.out_proj.weight)
        put(f"{layer}self_attn.out_proj.bias", block.attn.out_proj.bias)
        for ours, theirs in (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2")):
            put(f"{layer}{theirs}.weight", getattr(block, ours).weight)
            put(f"{layer}{theirs}.bias", getattr(block, ours).bias)
        for ours, theirs in (("c_fc", "fc1"), ("c_proj", "fc2")):
            put(f"{layer}mlp.{theirs}.weight", getattr(block.mlp, ours).weight)
            put(f"{layer}mlp.{theirs}.bias", getattr(block.mlp, ours).bias)
    put(f"{p}final_layer_norm.weight", tower.ln_final.weight)
    put(f"{p}final_layer_norm.bias", tower.ln_final.bias)
    if tower.text_projection is not None:
        # open_clip applies x @ P with P [width, embed_dim]; nn.Linear stores P transposed.
        put("text_projection.weight", tower.text_projection.t())
    return out


def open_clip_to_transformers(
    text_encoder: TextEncoder | nn.Module, with_projection: bool = True
) -> CLIPTextModel | CLIPTextModelWithProjection:
    """Our text encoder → a transformers ``CLIPTextModelWithProjection`` (or ``CLIPTextModel``) with copies of its weights.

    Called on our token ids with our ``attention_mask`` (as diffusers' pipelines call it with the tokenizer's),
    ``last_hidden_state`` equals our ``hidden`` and ``text_embeds`` our ``pooled`` (float rounding aside).
    """
    config = clip_text_config(text_encoder)
    state = to_transformers_state_dict(text_encoder)
    if with_projection:
        model = CLIPTextModelWithProjection(config)
    else:
        model = CLIPTextModel(config)
        state.pop("text_projection.weight", None)
    _load_transformers_state(model, state)
    return model.eval()


def _load_transformers_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load ``text_model.*``-named tensors into either transformers layout (v5's CLIPTextModel drops the prefix)."""
    names = set(model.state_dict())
    if not any(name.startswith(TRANSFORMERS_PREFIX) for name in names):
        state = {k.removeprefix(TRANSFORMERS_PREFIX): v for k, v in state.items()}
    missing = names - set(state)
    unexpected = set(state) - names
    if missing or unexpected:
        raise ValueError(
            f"converted text encoder weights do not fit {type(model).__name__}: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    model.load_state_dict(dict(state), strict=True)


def text_encoder_kwargs(
    config: CLIPTextConfig, pad_token_id: int, model_name: str = "clip-text", embed_dim: int | None = None
) -> dict[str, Any]:
    """Our ``TextEncoder`` constructor kwargs for a transformers CLIP text config (random init, no download).

    ``pad_token_id`` is the tokenizer folder's (not the model config's, which diffusers never reads);
    ``embed_dim`` is the pooled projection's width (default: the hidden width, i.e. no projection).
    """
    width, intermediate = int(config.hidden_size), int(config.intermediate_size)
    mlp_ratio = intermediate / width
    if int(width * mlp_ratio) != intermediate:  # open_clip sizes its MLP as int(width · mlp_ratio)
        raise ValueError(
            f"CLIP text config intermediate_size={intermediate} is not representable as width · mlp_ratio"
        )
    if config.hidden_act not in ("gelu", "quick_gelu"):
        raise ValueError(
            f"CLIP text config hidden_act={config.hidden_act!r}: open_clip text towers use 'gelu' or 'quick_gelu'"
        )
    if abs(float(config.layer_norm_eps) - 1e-5) > 1e-12:
        raise ValueError(
            f"CLIP text config layer_norm_eps={config.layer_norm_eps}: open_clip's LayerNorm uses 1e-5"
        )
    text_cfg = {
        "width": width,
        "layers": int(config.num_hidden_layers),
        "heads": int(config.num_attention_heads),
        "context_length": int(config.max_position_embeddings),
        "vocab_size": int(config.vocab_size),
        "mlp_ratio": mlp_ratio,
    }
    return {
        "model_name": model_name,
        "pretrained": None,
        "model_cfg": {
            "embed_dim": int(embed_dim if embed_dim is not None else width),
            "quick_gelu": config.hidden_act == "quick_gelu",
            "text_cfg": text_cfg,
        },
        "context_length": int(config.max_position_embeddings),
        "pad_token_id": int(pad_token_id),
    }


def from_transformers_state_dict(
    state: Mapping[str, torch.Tensor], num_layers: int, text_projection: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """transformers CLIP text weights (with or without the ``text_model.`` prefix) → our ``TextEncoder`` state dict.

    ``text_projection``: the ``[embed_dim, width]`` Linear weight (``text_projection.weight`` of a
    ``CLIPTextModelWithProjection``); without one the projection is the identity, so that our pooled
    output equals ``CLIPTextModel``'s ``pooler_output`` (embed_dim = width for CLIP-H and CLIP-bigG).
    """
    plain = {k.removeprefix(TRANSFORMERS_PREFIX): v for k, v in state.items()}
    if text_projection is None:
        text_projection = plain.get("text_projection.weight")

    def take(name: str) -> torch.Tensor:
        if name not in plain:
            raise ValueError(
                f"transformers CLIP text weights lack {name!r}; is this a CLIPTextModel checkpoint?"
            )
        return plain[name].detach().clone()

    out = {
        "text.token_embedding.weight": take("embeddings.token_embedding.weight"),
        "text.positional_embedding": take("embeddings.position_embedding.weight"),
        "text.ln_final.weight": take("final_layer_norm.weight"),
        "text.ln_final.bias": take("final_layer_norm.bias"),
    }
    for i in range(num_layers):
        theirs, ours = f"encoder.layers.{i}.", f"text.transformer.resblocks.{i}."
        out[f"{ours}attn.in_proj_weight"] = torch.cat(
            [take(f"{theirs}self_attn.{part}_proj.weight") for part in ("q", "k", "v")], dim=0
        )
        out[f"{ours}attn.in_proj_bias"] = torch.cat(
            [take(f"{theirs}self_attn.{part}_proj.bias") for part in ("q", "k", "v")], dim=0
        )
        for kind in ("weight", "bias"):
            out[f"{ours}attn.out_proj.{kind}"] = take(f"{theirs}self_attn.out_proj.{kind}")
            out[f"{ours}ln_1.{kind}"] = take(f"{theirs}layer_norm1.{kind}")
            out[f"{ours}ln_2.{kind}"] = take(f"{theirs}layer_norm2.{kind}")
            out[f"{ours}mlp.c_fc.{kind}"] = take(f"{theirs}mlp.fc1.{kind}")
            out[f"{ours}mlp.c_proj.{kind}"] = take(f"{theirs}mlp.fc2.{kind}")
    width = out["text.token_embedding.weight"].shape[1]
    if text_projection is None:
        out["text.text_projection"] = torch.eye(width, dtype=out["text.token_embedding.weight"].dtype)
    else:
        out["text.text_projection"] = text_projection.detach().t().contiguous().clone()
    return out


def transformers_to_open_clip(
    model: CLIPTextModel | CLIPTextModelWithProjection,
    pad_token_id: int,
    text_projection: torch.Tensor | None = None,
    model_name: str = "clip-text",
) -> tuple[TextEncoder, dict[str, Any]]:
    """A transformers CLIP text model → (our ``TextEncoder`` with copies of its weights, its constructor kwargs).

    ``pad_token_id`` is the tokenizer folder's; see :func:`from_transformers_state_dict` for the projection.
    """
    state = dict(model.state_dict())
    if text_projection is None and "text_projection.weight" in state:
        text_projection = state["text_projection.weight"]
    embed_dim = int(text_projection.shape[0]) if text_projection is not None else None
    kwargs = text_encoder_kwargs(model.config, pad_token_id, model_name, embed_dim)
    with torch.device("meta"):
        encoder = TextEncoder(**kwargs)
    ours = from_transformers_state_dict(state, int(model.config.num_hidden_layers), text_projection)
    encoder.load_state_dict(ours, strict=True, assign=True)
    # The causal-mask buffer is not in the state dict: rebuild it on the CPU.
    encoder.text.attn_mask = encoder.text.build_causal_mask()
    return encoder.requires_grad_(False).eval(), kwargs
