"""Shard specs: every way a config can name shards, and clear errors when it names none."""

from __future__ import annotations

import logging
import shutil

import fsspec
import pytest

from wurst.data.shard_spec import expand_shards, open_shard


def test_brace_pattern_expands_in_order(clean_shards):
    folder, _ = clean_shards
    assert expand_shards(f"{folder}/{{00002..00004}}.tar") == [str(folder / f"0000{i}.tar") for i in (2, 3, 4)]


def test_a_folder_means_every_tar_inside_sorted(clean_shards):
    folder, manifest = clean_shards
    assert expand_shards(str(folder)) == [str(folder / name) for name in manifest["shards"]]


def test_globs_lists_and_double_colon_joins_all_work(clean_shards):
    folder, _ = clean_shards
    assert len(expand_shards(f"{folder}/0000[0-3].tar")) == 4
    assert len(expand_shards([f"{folder}/00000.tar", f"{folder}/{{00001..00002}}.tar"])) == 3
    assert len(expand_shards(f"{folder}/00000.tar::{folder}/00007.tar")) == 2


def test_pipe_commands_are_kept_and_open_as_streams(clean_shards):
    folder, _ = clean_shards
    urls = expand_shards(f"pipe:cat {folder}/{{00000..00001}}.tar")
    assert urls == [f"pipe:cat {folder}/00000.tar", f"pipe:cat {folder}/00001.tar"]
    with open_shard(urls[0]) as stream:
        assert stream.read() == (folder / "00000.tar").read_bytes()


def test_fsspec_urls_with_globs_and_folders(clean_shards):
    folder, _ = clean_shards
    memory = fsspec.filesystem("memory")
    for name in ("00000.tar", "00001.tar"):
        memory.pipe(f"/spec-test/{name}", (folder / name).read_bytes())
    assert expand_shards("memory://spec-test/*.tar") == ["memory:///spec-test/00000.tar", "memory:///spec-test/00001.tar"]
    assert expand_shards("memory://spec-test/") == expand_shards("memory://spec-test/*.tar")
    with open_shard("memory:///spec-test/00001.tar") as stream:
        assert stream.read() == (folder / "00001.tar").read_bytes()


def test_an_empty_spec_is_an_error():
    with pytest.raises(ValueError, match="shard spec is empty"):
        expand_shards("")
    with pytest.raises(ValueError, match="shard list is empty"):
        expand_shards([])


def test_a_pattern_matching_nothing_is_an_error_naming_it(tmp_path):
    with pytest.raises(ValueError, match="matched no shard") as error:
        expand_shards(f"{tmp_path}/nothing-{{000..009}}.tar")
    assert "nothing-000.tar" in str(error.value)
    with pytest.raises(ValueError, match="matched no shard"):
        expand_shards("memory://no-such-bucket/*.tar")


def test_named_but_absent_local_shards_are_dropped_with_a_warning(clean_shards, tmp_path, caplog):
    folder, _ = clean_shards
    shutil.copy(folder / "00000.tar", tmp_path / "00000.tar")
    with caplog.at_level(logging.WARNING):
        assert expand_shards(f"{tmp_path}/{{00000..00002}}.tar") == [str(tmp_path / "00000.tar")]
    assert "2 of 3 named shards do not exist" in caplog.text
