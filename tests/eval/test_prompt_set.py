"""Prompt files: JSON lines or plain text; ids are unique file names; indices seed the images."""

from __future__ import annotations

import json

import pytest

from wurst.eval.prompt_set import PromptRecord, read_prompt_file, write_prompt_file


def write_lines(path, rows):
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return path


def test_jsonl_round_trip_keeps_ids_captions_image_ids_and_order(tmp_path):
    records = [PromptRecord(0, "000000000042", "a cat", 42), PromptRecord(1, "b", "a dog")]
    assert read_prompt_file(write_prompt_file(tmp_path / "p.jsonl", records)) == records


def test_text_file_gets_line_number_ids_and_skips_blank_lines(tmp_path):
    (tmp_path / "p.txt").write_text("a red circle\n\n  a blue square  \n")
    records = read_prompt_file(tmp_path / "p.txt")
    assert [(r.index, r.id, r.caption) for r in records] == [
        (0, "000000", "a red circle"),
        (1, "000001", "a blue square"),
    ]


def test_limit_keeps_the_first_prompts(tmp_path):
    (tmp_path / "p.txt").write_text("a\nb\nc\n")
    assert [r.caption for r in read_prompt_file(tmp_path / "p.txt", limit=2)] == ["a", "b"]


def test_duplicate_ids_are_rejected(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", [{"id": "x", "caption": "a"}, {"id": "x", "caption": "b"}])
    with pytest.raises(ValueError, match="'x' appears twice"):
        read_prompt_file(path)


def test_ids_that_are_not_file_names_are_rejected(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", [{"id": "../escape", "caption": "a"}])
    with pytest.raises(ValueError, match=r"p.jsonl:1: prompt id '../escape' is not a plain file name"):
        read_prompt_file(path)


def test_missing_fields_are_named_with_their_line(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", [{"id": "a", "caption": "x"}, {"id": "b"}])
    with pytest.raises(ValueError, match=r"p.jsonl:2 lacks \['caption'\]"):
        read_prompt_file(path)


def test_a_missing_prompt_file_says_how_to_make_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="wurst-data coco30k"):
        read_prompt_file(tmp_path / "nope.jsonl")
