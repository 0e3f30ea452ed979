"""open_clip's BPE vocabulary → the files of a transformers ``CLIPTokenizer``.

open_clip ships its byte-pair vocabulary as ``bpe_simple_vocab_16e6.txt.gz`` (the OpenAI CLIP file);
transformers (and so diffusers' Würstchen pipelines, whose ``tokenizer/`` folders hold a
``CLIPTokenizer``) read ``vocab.json`` + ``merges.txt``. This module writes those files, so a text
encoder trained or run through open_clip can be published and scored without any download.

Token ids are identical to open_clip's ``SimpleTokenizer``: the 256 byte symbols, the same 256 with
the end-of-word mark ``</w>``, the 48,894 merges in rank order, then start/end of text (ids 49406 and
49407; transformers names them ``<|startoftext|>``/``<|endoftext|>`` where open_clip says
``<start_of_text>``/``<end_of_text>``). Truncation agrees too (start + first 75 tokens + end).

Padding: the folder declares the padding token our ``TextEncoder`` pads with (its ``pad_token_id``):
``<|endoftext|>`` (49407) as the public Würstchen v2 folders do (the default), or ``!`` (id 0), as some
other CLIP folders do. With ``!`` declared, transformers treats it as a special token, so a literal ``!``
in a caption becomes id 0 instead of open_clip's 256 (``!</w>``) — the known quirk of those folders
(diffusers issue #4153). Differences that remain either way: open_clip also runs ``ftfy`` and
HTML-unescaping on captions; transformers' CLIP normaliser only folds whitespace and case.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

# The vocabulary layout of CLIP's BPE file (Radford et al. 2021, as open_clip reads it): a header
# line, then merges in rank order, of which the first 49152 − 256 − 2 are used.
BYTE_SYMBOLS = 256
MERGES = 49152 - BYTE_SYMBOLS - 2
VOCAB_SIZE = 2 * BYTE_SYMBOLS + MERGES + 2  # 49,408
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"


def default_bpe_path() -> Path:
    """The BPE file bundled with open_clip (``open_clip/bpe_simple_vocab_16e6.txt.gz``)."""
    from open_clip.tokenizer import default_bpe

    return Path(default_bpe())


def open_clip_vocab_and_merges(bpe_path: str | Path | None = None) -> tuple[dict[str, int], list[str]]:
    """Read open_clip's gzipped BPE file: ``(vocab token → id [49,408 entries], merges ["a b", ...])``.

    The ids are those open_clip's ``SimpleTokenizer`` assigns, with transformers' spelling of the two
    special tokens.
    """
    from open_clip.tokenizer import bytes_to_unicode

    path = Path(bpe_path) if bpe_path is not None else default_bpe_path()
    if not path.is_file():
        raise FileNotFoundError(
            f"bpe_path {path} does not exist; pass open_clip's bpe_simple_vocab_16e6.txt.gz "
            "(or leave bpe_path=None to use the copy bundled with open_clip)"
        )
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"bpe_path {path} is not a gzipped UTF-8 BPE merges file: {error}") from error
    merges = lines[1 : MERGES + 1]
    if len(merges) != MERGES or any(len(merge.split()) != 2 for merge in merges):
        raise ValueError(
            f"bpe_path {path} does not hold CLIP's {MERGES} BPE merges after its header line "
            f"(found {len(merges)} lines, or lines that are not two symbols); use open_clip's "
            "bpe_simple_vocab_16e6.txt.gz"
        )
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [symbol + "</w>" for symbol in symbols] + ["".join(m.split()) for m in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise ValueError(f"bpe_path {path} yields {len(vocab)} distinct tokens, expected {VOCAB_SIZE}")
    return vocab, merges


def token_of_id(token_id: int, bpe_path: str | Path | None = None) -> str:
    """The vocabulary entry of ``token_id`` (e.g. 49407 → ``<|endoftext|>``, 0 → ``!``)."""
    vocab, _ = open_clip_vocab_and_merges(bpe_path)
    tokens = {index: token for token, index in vocab.items()}
    if token_id not in tokens:
        raise ValueError(f"token id {token_id} is not in the CLIP vocabulary [0, {VOCAB_SIZE})")
    return tokens[token_id]


def write_clip_tokenizer(
    out_dir: str | Path,
    *,
    bpe_path: str | Path | None = None,
    context_length: int = 77,
    pad_token: str = EOS_TOKEN,
) -> Path:
    """Write ``vocab.json``, ``merges.txt``, ``tokenizer_config.json`` and ``special_tokens_map.json``.

    The folder loads with ``transformers.CLIPTokenizer.from_pretrained(out_dir)`` (any transformers
    version, and diffusers' ``tokenizer`` subfolders) and gives open_clip's ids; see the module
    docstring for ``pad_token``. Returns ``out_dir``.
    """
    if not isinstance(context_length, int) or context_length < 2:
        raise ValueError(f"context_length must be an int ≥ 2 (start + end token), got {context_length!r}")
    vocab, merges = open_clip_vocab_and_merges(bpe_path)
    if pad_token not in vocab:
        raise ValueError(
            f"pad_token {pad_token!r} is not in the CLIP vocabulary; use '!' (open_clip's id 0, the LAION "
            f"layout) or {EOS_TOKEN!r} (the OpenAI layout)"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    # transformers' merges files start with a version header, which it skips.
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": pad_token}
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": context_length,
        "do_lower_case": True,
        "add_prefix_space": False,
        "errors": "replace",
        **special,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")
    return out
