"""Text encoder: a frozen open_clip text tower giving per-token states after ln_final and the pooled EOT."""

from __future__ import annotations

import json

import open_clip
import pytest
import safetensors.torch
import torch

from wurst.models.text_encoder import TextEncoder

TINY_TEXT = {"width": 64, "layers": 2, "heads": 2, "context_length": 77, "vocab_size": 49408}
TINY_VISION = {"image_size": 32, "patch_size": 16, "width": 64, "layers": 1, "head_width": 32}
CAPTIONS = ["a photo of a cat", "an oil painting of a sausage", ""]


def test_outputs_per_token_states_and_pooled_embedding(tiny_text_encoder):
    hidden, pooled = tiny_text_encoder(CAPTIONS)
    assert hidden.shape == (3, 77, 64) and pooled.shape == (3, 64)
    assert tiny_text_encoder.width == 64


def test_tokenize_gives_77_ids_starting_with_the_start_token(tiny_text_encoder):
    tokens = tiny_text_encoder.tokenize(CAPTIONS)
    assert tokens.shape == (3, 77) and tokens.dtype == torch.long
    assert (tokens[:, 0] == tiny_text_encoder.tokenizer.sot_token_id).all()


def test_is_frozen_and_stays_in_eval_mode(tiny_text_encoder):
    parent = torch.nn.ModuleDict({"text_encoder": tiny_text_encoder}).train()
    assert not any(p.requires_grad for p in tiny_text_encoder.parameters())
    assert not any(m.training for m in parent["text_encoder"].modules())
    hidden, pooled = tiny_text_encoder(CAPTIONS)
    assert not hidden.requires_grad and not pooled.requires_grad


def test_same_captions_give_identical_states(tiny_text_encoder):
    first, second = tiny_text_encoder(CAPTIONS), tiny_text_encoder(CAPTIONS)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_different_captions_give_different_states(tiny_text_encoder):
    hidden, pooled = tiny_text_encoder(["a red apple", "a blue car"])
    assert not torch.allclose(hidden[0], hidden[1]) and not torch.allclose(pooled[0], pooled[1])


def test_rejects_a_bare_string(tiny_text_encoder):
    with pytest.raises(ValueError, match="list of strings"):
        tiny_text_encoder("a photo of a cat")


def _full_clip() -> open_clip.CLIP:
    """A whole tiny open_clip CLIP (vision tower too), as an open_clip checkpoint holds it."""
    torch.manual_seed(3)
    return open_clip.CLIP(embed_dim=64, vision_cfg=TINY_VISION, text_cfg=TINY_TEXT).eval()


def _reference_states(clip: open_clip.CLIP, tokens: torch.Tensor) -> torch.Tensor:
    """Per-token states after ln_final, computed from the full CLIP's own modules."""
    x = clip.token_embedding(tokens) + clip.positional_embedding
    return clip.ln_final(clip.transformer(x, attn_mask=clip.attn_mask))


def test_loads_text_weights_from_a_local_open_clip_checkpoint_file(tmp_path):
    clip = _full_clip()
    path = tmp_path / "tiny_clip.pt"
    torch.save({"state_dict": clip.state_dict(), "epoch": 1}, path)  # open_clip's training checkpoint layout
    encoder = TextEncoder(model_name="tiny", pretrained=str(path), model_cfg={"embed_dim": 64, **TINY_TEXT})
    hidden, pooled = encoder(CAPTIONS)
    tokens = encoder.tokenize(CAPTIONS)
    with torch.no_grad():
        torch.testing.assert_close(pooled, clip.encode_text(tokens))
        reference = _reference_states(clip, tokens)
    # Through the end-of-text token the causal states are the checkpoint's own; after it our padding keys
    # are masked (diffusers' convention, tests/hub/test_clip_text_model.py), open_clip's are not.
    for row, end in enumerate(encoder.end_of_text_index(tokens).tolist()):
        torch.testing.assert_close(hidden[row, : end + 1], reference[row, : end + 1])


def test_loads_architecture_and_weights_from_a_local_open_clip_directory(tmp_path):
    clip = _full_clip()
    safetensors.torch.save_file(clip.state_dict(), tmp_path / "open_clip_model.safetensors")
    model_cfg = {"embed_dim": 64, "vision_cfg": TINY_VISION, "text_cfg": TINY_TEXT}
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg}))
    encoder = TextEncoder(model_name="tiny", pretrained=str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(encoder(CAPTIONS)[1], clip.encode_text(encoder.tokenize(CAPTIONS)))


def test_checkpoint_of_another_architecture_is_a_clear_error(tmp_path):
    path = tmp_path / "tiny_clip.safetensors"
    safetensors.torch.save_file(_full_clip().state_dict(), path)
    with pytest.raises(ValueError, match="does not fit"):
        TextEncoder(model_name="tiny", pretrained=str(path), model_cfg={**TINY_TEXT, "width": 32})


def test_unknown_pretrained_tag_names_the_known_tags():
    with pytest.raises(ValueError, match="laion2b_s32b_b79k"):
        TextEncoder(model_name="ViT-H-14", pretrained="no_such_tag")


def test_paper_architectures_build_text_towers_of_the_paper_widths(model_conf):
    # Meta device: the architectures, not their (downloaded) weights, are under test.
    for name, width in [("paper", 1280), ("paper_clip_h", 1024)]:
        cfg = model_conf("text_encoder", name)
        with torch.device("meta"):
            encoder = TextEncoder(model_name=cfg.model_name, context_length=cfg.context_length)
        assert encoder.width == width
        assert not any(n.startswith("visual") for n, _ in encoder.named_parameters())
