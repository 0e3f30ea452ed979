"""open_clip text tower ↔ transformers CLIPTextModel: same states from the same weights."""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPTextModel

from wurst.models.hub.clip_text_model import (
    PaddingMaskedTextEncoder,
    clip_text_config,
    open_clip_to_transformers,
    padding_attention_mask,
    padding_masked_states,
    to_transformers_state_dict,
    transformers_to_open_clip,
)
from wurst.models.text_encoder import TextEncoder

CAPTIONS = [
    "a red circle on a blue background",
    "",
    "two dogs playing in the snow, photographed at dusk " * 12,  # longer than 77 tokens: truncated
]
TOLERANCE = 1e-5  # the acceptance bound (float32 CPU); measured ≈ 2e-6 for these towers


def tiny_encoder(quick_gelu: bool = False, embed_dim: int = 48, seed: int = 0) -> TextEncoder:
    torch.manual_seed(seed)
    text_cfg = {"width": 64, "layers": 2, "heads": 4, "context_length": 77, "vocab_size": 49408}
    return TextEncoder(
        model_name="tiny-clip-text",
        model_cfg={"embed_dim": embed_dim, "quick_gelu": quick_gelu, "text_cfg": text_cfg},
    )


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    return tiny_encoder()


@pytest.fixture(scope="module")
def converted(encoder):
    return open_clip_to_transformers(encoder)


@pytest.mark.parametrize(
    "quick_gelu", [False, True], ids=["gelu (LAION ViT-H/bigG)", "quick_gelu (OpenAI CLIP)"]
)
def test_transformers_hidden_states_and_pooled_equal_open_clip_within_1e_5(quick_gelu):
    encoder = tiny_encoder(quick_gelu)
    model = open_clip_to_transformers(encoder)
    hidden, pooled = encoder(CAPTIONS)
    output = model(encoder.tokenize(CAPTIONS))  # no attention mask: causal only, like open_clip
    assert model.config.hidden_act == ("quick_gelu" if quick_gelu else "gelu")
    assert (output.last_hidden_state - hidden).abs().max() < TOLERANCE
    assert (output.text_embeds - pooled).abs().max() < TOLERANCE


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
    tokens = encoder.tokenize(CAPTIONS)
    assert (loaded(tokens).last_hidden_state - encoder(CAPTIONS)[0]).abs().max() < TOLERANCE


def test_converting_back_to_open_clip_gives_identical_states(encoder, converted):
    back = transformers_to_open_clip(converted)
    assert all(torch.equal(back.state_dict()[k], v) for k, v in encoder.state_dict().items())
    assert torch.equal(back(CAPTIONS)[0], encoder(CAPTIONS)[0])


def test_a_text_model_without_projection_pools_like_its_pooler_output(encoder):
    plain = open_clip_to_transformers(encoder, with_projection=False)
    back = transformers_to_open_clip(plain)
    _, pooled = back(CAPTIONS)
    assert (pooled - plain(encoder.tokenize(CAPTIONS)).pooler_output).abs().max() < TOLERANCE


def test_attention_mask_covers_start_to_end_of_text(encoder):
    tokens = encoder.tokenize(["a cat", ""])
    assert padding_attention_mask(tokens).sum(dim=1).tolist() == [4, 2]  # <start> a cat <end>; <start> <end>


def test_padding_masked_states_equal_transformers_with_the_tokenizers_attention_mask(encoder, converted):
    tokens = encoder.tokenize(CAPTIONS)
    expected = converted(tokens, attention_mask=padding_attention_mask(tokens))
    hidden, pooled = PaddingMaskedTextEncoder(encoder)(CAPTIONS)
    assert (hidden - expected.last_hidden_state).abs().max() < TOLERANCE
    assert (pooled - expected.text_embeds).abs().max() < TOLERANCE


def test_open_clip_and_masked_states_agree_through_end_of_text_and_differ_on_padding(encoder):
    """The one convention no conversion removes (diffusers passes the attention mask; open_clip has none)."""
    plain, _ = encoder(CAPTIONS[:1])
    masked, _ = padding_masked_states(encoder, CAPTIONS[:1])
    end = int(encoder.tokenize(CAPTIONS[:1]).argmax())
    assert (plain[0, : end + 1] - masked[0, : end + 1]).abs().max() < TOLERANCE
    assert (plain[0, end + 1 :] - masked[0, end + 1 :]).abs().max() > 0.1


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
