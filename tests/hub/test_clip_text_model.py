"""open_clip text tower ↔ transformers CLIPTextModel: same states from the same weights.

The reference is what diffusers' Würstchen pipelines run: a ``CLIPTokenizer`` folder called with
padding="max_length", truncation=True, and the ``CLIPTextModel`` called with the tokenizer's ids *and*
``attention_mask``. Our ``TextEncoder`` must give the same states at all 77 positions.
"""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPTextModel, CLIPTokenizer

from wurst.models.hub.clip_text_model import (
    clip_text_config,
    open_clip_to_transformers,
    to_transformers_state_dict,
    transformers_to_open_clip,
)
from wurst.models.hub.clip_tokenizer import token_of_id, write_clip_tokenizer
from wurst.models.text_encoder import TextEncoder

CAPTIONS = [
    "a red circle on a blue background",
    "",
    "two dogs playing in the snow, photographed at dusk " * 12,  # longer than 77 tokens: truncated
]
TOLERANCE = 1e-5  # the acceptance bound (float32 CPU); measured ≈ 2e-6 for these towers


def tiny_encoder(quick_gelu: bool = False, embed_dim: int = 48, seed: int = 0, pad_token_id: int = 49407) -> TextEncoder:
    torch.manual_seed(seed)
    text_cfg = {"width": 64, "layers": 2, "heads": 4, "context_length": 77, "vocab_size": 49408}
    return TextEncoder(
        model_name="tiny-clip-text",
        model_cfg={"embed_dim": embed_dim, "quick_gelu": quick_gelu, "text_cfg": text_cfg},
        pad_token_id=pad_token_id,
    )


def diffusers_text_states(tokenizer: CLIPTokenizer, model, captions: list[str]):
    """The text conditioning as diffusers' Würstchen pipelines compute it (``encode_prompt``)."""
    inputs = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                       return_tensors="pt")
    with torch.no_grad():
        return inputs.input_ids, model(inputs.input_ids, attention_mask=inputs.attention_mask)


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    return tiny_encoder()


@pytest.fixture(scope="module")
def converted(encoder):
    return open_clip_to_transformers(encoder)


@pytest.mark.parametrize("pad_token_id", [49407, 0], ids=["<|endoftext|> (public v2 folders)", "! (other CLIP folders)"])
@pytest.mark.parametrize(
    "quick_gelu", [False, True], ids=["gelu (LAION ViT-H/bigG)", "quick_gelu (OpenAI CLIP)"]
)
def test_our_states_equal_the_diffusers_pipelines_text_conditioning_at_all_77_positions(quick_gelu, pad_token_id, tmp_path):
    encoder = tiny_encoder(quick_gelu, pad_token_id=pad_token_id)
    model = open_clip_to_transformers(encoder)
    tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(tmp_path, pad_token=token_of_id(pad_token_id)))
    ids, output = diffusers_text_states(tokenizer, model, CAPTIONS)
    hidden, pooled = encoder(CAPTIONS)
    assert model.config.hidden_act == ("quick_gelu" if quick_gelu else "gelu")
    assert torch.equal(encoder.tokenize(CAPTIONS), ids)
    assert (ids[1, 2:] == pad_token_id).all()  # "" pads with the folder's id
    assert (output.last_hidden_state - hidden).abs().max() < TOLERANCE
    assert (output.text_embeds - pooled).abs().max() < TOLERANCE


def test_padding_keys_are_masked_so_states_do_not_depend_on_what_fills_the_padding():
    """Without the key mask (open_clip's own tower) the states of "" would change with the pad id."""
    with_eot, with_zero = tiny_encoder(pad_token_id=49407), tiny_encoder(pad_token_id=0)
    hidden_eot, pooled_eot = with_eot(CAPTIONS[:2])
    hidden_zero, pooled_zero = with_zero(CAPTIONS[:2])
    end = int(with_eot.end_of_text_index(with_eot.tokenize(CAPTIONS[:1]))[0])
    assert (hidden_eot[0, : end + 1] - hidden_zero[0, : end + 1]).abs().max() < TOLERANCE
    assert (pooled_eot - pooled_zero).abs().max() < TOLERANCE
    # at padding positions the token embedding itself differs (49407 vs 0), so the states differ there
    assert (hidden_eot[0, end + 1 :] - hidden_zero[0, end + 1 :]).abs().max() > 0.01


def test_config_pools_the_first_end_of_text_token(converted):
    # eos_token_id 2 would switch transformers to the legacy argmax pooling; 49407 is CLIP's end of text.
    assert (converted.config.eos_token_id, converted.config.bos_token_id) == (49407, 49406)
    assert converted.config.max_position_embeddings == 77 and converted.config.projection_dim == 48


def test_weights_use_the_public_text_model_layout(encoder, tmp_path):
    """``text_model.*`` names (the Hub folders' layout) load into a CLIPTextModel with nothing missing."""
    state = to_transformers_state_dict(encoder)
    assert all(k.startswith("text_model.") for k in state if k != "text_projection.weight")
    from safetensors.torch import save_file

    config = clip_text_config(encoder)
    config.save_pretrained(tmp_path)
    save_file(
        {k: v for k, v in state.items() if k != "text_projection.weight"}, str(tmp_path / "model.safetensors")
    )
    loaded = CLIPTextModel.from_pretrained(tmp_path).eval()
    tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(tmp_path / "tokenizer"))
    _, output = diffusers_text_states(tokenizer, loaded, CAPTIONS)
    assert (output.last_hidden_state - encoder(CAPTIONS)[0]).abs().max() < TOLERANCE


def test_converting_back_to_open_clip_gives_identical_states(encoder, converted):
    back, kwargs = transformers_to_open_clip(converted, pad_token_id=encoder.pad_token_id)
    assert kwargs["pad_token_id"] == encoder.pad_token_id
    assert all(torch.equal(back.state_dict()[k], v) for k, v in encoder.state_dict().items())
    assert torch.equal(back(CAPTIONS)[0], encoder(CAPTIONS)[0])


def test_a_text_model_without_projection_pools_like_its_pooler_output(encoder, tmp_path):
    plain = open_clip_to_transformers(encoder, with_projection=False)
    back, _ = transformers_to_open_clip(plain, pad_token_id=49407)
    _, pooled = back(CAPTIONS)
    tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(tmp_path))
    _, output = diffusers_text_states(tokenizer, plain, CAPTIONS)
    assert (pooled - output.pooler_output).abs().max() < TOLERANCE


def test_attention_mask_covers_start_to_end_of_text(encoder):
    tokens = encoder.tokenize(["a cat", ""])
    assert encoder.attention_mask(tokens).sum(dim=1).tolist() == [4, 2]  # <start> a cat <end>; <start> <end>


def test_a_tower_with_layer_scale_is_refused_with_the_reason():
    text_cfg = {
        "width": 64,
        "layers": 1,
        "heads": 4,
        "context_length": 77,
        "vocab_size": 49408,
        "ls_init_value": 0.1,
    }
    encoder = TextEncoder(model_name="tiny-clip-text", model_cfg={"embed_dim": 64, "text_cfg": text_cfg})
    with pytest.raises(ValueError, match="cannot be converted to a transformers CLIPTextModel.*layer scale"):
        open_clip_to_transformers(encoder)
