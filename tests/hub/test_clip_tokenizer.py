"""The open_clip BPE → transformers CLIPTokenizer converter gives open_clip's token ids."""

from __future__ import annotations

import gzip
import json

import open_clip
import pytest
import torch
from transformers import CLIPTokenizer

from wurst.models.hub.clip_tokenizer import VOCAB_SIZE, write_clip_tokenizer

CAPTIONS = [
    "A red circle on a blue background",
    "two dogs playing in the snow, photographed at dusk",
    "Würstchen: an efficient architecture for large-scale text-to-image diffusion models",
    "a café in Zürich with 3 tables and 12 chairs",
    "",
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return write_clip_tokenizer(tmp_path_factory.mktemp("clip_tokenizer"))


@pytest.fixture(scope="module")
def hf_tokenizer(tokenizer_dir) -> CLIPTokenizer:
    return CLIPTokenizer.from_pretrained(tokenizer_dir)


def hf_ids(tokenizer: CLIPTokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(
        captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids


def test_writes_the_transformers_tokenizer_files(tokenizer_dir):
    names = {p.name for p in tokenizer_dir.iterdir()}
    assert {"vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"} <= names
    vocab = json.loads((tokenizer_dir / "vocab.json").read_text())
    assert len(vocab) == VOCAB_SIZE == 49408
    assert (vocab["<|startoftext|>"], vocab["<|endoftext|>"], vocab["!"]) == (49406, 49407, 0)


def test_ids_equal_open_clip_up_to_the_end_token_then_pad_with_end_of_text(hf_tokenizer):
    ours, theirs = hf_ids(hf_tokenizer, CAPTIONS), open_clip.tokenize(CAPTIONS)  # open_clip pads with 0
    kept = torch.arange(77)[None] <= (theirs == 49407).int().argmax(dim=-1)[:, None]
    assert torch.equal(ours[kept], theirs[kept])
    assert (ours[~kept] == 49407).all()


def test_exclamation_padding_gives_open_clips_zero_padding(tmp_path):
    tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(tmp_path, pad_token="!"))
    assert torch.equal(hf_ids(tokenizer, CAPTIONS), open_clip.tokenize(CAPTIONS))


def test_long_captions_truncate_like_open_clip(hf_tokenizer):
    long = [" ".join(["an extraordinarily detailed painting of a lighthouse"] * 30)]
    ours, theirs = hf_ids(hf_tokenizer, long), open_clip.tokenize(long)
    assert theirs[0, -1] == 49407  # open_clip ends a truncated caption with the end token
    assert torch.equal(ours, theirs)


def test_exclamation_pad_token_reproduces_the_known_quirk(tmp_path):
    # Documented behaviour of folders that declare '!' as the pad token: a literal '!' maps to 0.
    tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(tmp_path, pad_token="!"))
    assert hf_ids(tokenizer, ["wow!"])[0, 2].item() == 0
    assert open_clip.tokenize(["wow!"])[0, 2].item() == 256


def test_default_eos_pad_token_tokenizes_exclamation_like_open_clip(hf_tokenizer):
    ours, theirs = hf_ids(hf_tokenizer, ["wow! look!"]), open_clip.tokenize(["wow! look!"])
    length = int((theirs[0] == 49407).nonzero()[0]) + 1
    assert torch.equal(ours[0, :length], theirs[0, :length])
    assert (ours[0, length:] == 49407).all()


def test_context_length_sets_model_max_length(tmp_path):
    tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(tmp_path, context_length=16))
    assert tokenizer.model_max_length == 16


def test_missing_bpe_file_is_named(tmp_path):
    missing = tmp_path / "nope.txt.gz"
    with pytest.raises(FileNotFoundError, match="nope.txt.gz"):
        write_clip_tokenizer(tmp_path / "out", bpe_path=missing)


def test_a_file_that_is_not_a_clip_bpe_file_is_rejected(tmp_path):
    bad = tmp_path / "bad.txt.gz"
    with gzip.open(bad, "wt") as f:
        f.write("#version\na b\nc d\n")
    with pytest.raises(ValueError, match="48894 BPE merges"):
        write_clip_tokenizer(tmp_path / "out", bpe_path=bad)


def test_unknown_pad_token_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="pad_token '<pad>'"):
        write_clip_tokenizer(tmp_path, pad_token="<pad>")
