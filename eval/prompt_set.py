"""Prompt sets: the captions an evaluation generates from, each with a stable id.

A prompt file is either JSON lines, one ``{"id": ..., "caption": ..., "image_id": ...}`` per line
(``image_id`` optional; what :mod:`eval.coco30k` writes), or plain text with one caption per line
(ids are then the zero-padded line numbers of the non-empty lines). The id names the image file
``<id>.png``, so ids must be plain file-name characters; the prompt's position in the file is its
index, which seeds its image (seed = base seed + index) so results do not depend on batching.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

ID_PATTERN = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class PromptRecord:
    """One caption to generate from; ``index`` is its position in the prompt file (the seed offset)."""

    index: int
    id: str
    caption: str
    image_id: int | None = None

    def to_json(self) -> dict:
        row = {"id": self.id, "image_id": self.image_id, "caption": self.caption}
        return row if self.image_id is not None else {k: v for k, v in row.items() if k != "image_id"}


def check_prompt_id(prompt_id: str, where: str) -> str:
    """Ids become file names: letters, digits, ``_``, ``-``, ``.`` (not first)."""
    if not isinstance(prompt_id, str) or not ID_PATTERN.match(prompt_id):
        raise ValueError(
            f"{where}: prompt id {prompt_id!r} is not a plain file name; use letters, digits, '_', '-' and "
            "'.' (not first), e.g. '000123'"
        )
    return prompt_id


def read_prompt_file(path: str | Path, limit: int | None = None) -> list[PromptRecord]:
    """Read a ``.jsonl`` or ``.txt`` prompt file (see the module docstring); ``limit`` keeps the first N."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"prompt file {path} does not exist; build COCO-30K with `wurst-data coco30k` or pass a .txt "
            "file with one caption per line"
        )
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive int or None, got {limit!r}")
    lines = path.read_text(encoding="utf-8").splitlines()
    records = _read_jsonl(path, lines) if path.suffix == ".jsonl" else _read_text(lines)
    if not records:
        raise ValueError(f"prompt file {path} holds no prompts")
    seen: dict[str, int] = {}
    for record in records:
        if record.id in seen:
            raise ValueError(
                f"prompt file {path}: id {record.id!r} appears twice (prompts {seen[record.id]} and "
                f"{record.index}); ids name the image files and must be unique"
            )
        seen[record.id] = record.index
    return records[:limit] if limit is not None else records


def _read_jsonl(path: Path, lines: list[str]) -> list[PromptRecord]:
    records = []
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{line_number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where} is not valid JSON ({error})") from error
        if not isinstance(row, dict):
            raise TypeError(f"{where}: each line must be a JSON object with 'id' and 'caption'")
        missing = [key for key in ("id", "caption") if key not in row]
        if missing:
            raise ValueError(
                f"{where} lacks {missing}; each line needs 'id' and 'caption' ('image_id' optional)"
            )
        if not isinstance(row["caption"], str):
            raise TypeError(f"{where}: 'caption' must be a string, got {type(row['caption']).__name__}")
        image_id = row.get("image_id")
        records.append(
            PromptRecord(
                index=len(records),
                id=check_prompt_id(str(row["id"]), where),
                caption=row["caption"],
                image_id=int(image_id) if image_id is not None else None,
            )
        )
    return records


def _read_text(lines: list[str]) -> list[PromptRecord]:
    captions = [line.strip() for line in lines if line.strip()]
    return [PromptRecord(index=i, id=f"{i:06d}", caption=caption) for i, caption in enumerate(captions)]


def write_prompt_file(path: str | Path, records: Iterable[PromptRecord]) -> Path:
    """Write ``records`` as JSON lines (``id``, ``image_id`` when known, ``caption``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record.to_json(), ensure_ascii=False) + "\n")
    return path


def records_from_captions(captions: Sequence[str]) -> list[PromptRecord]:
    """Prompt records for in-memory captions, ids as a ``.txt`` prompt file would give them."""
    return [PromptRecord(index=i, id=f"{i:06d}", caption=str(caption)) for i, caption in enumerate(captions)]


__all__ = [
    "PromptRecord",
    "check_prompt_id",
    "read_prompt_file",
    "records_from_captions",
    "write_prompt_file",
]
