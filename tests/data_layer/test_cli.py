"""``wurst-data``: synth and inspect from the command line, and the subcommand hook for other packages."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from wurst.data import cli
from wurst.data.synthetic import read_manifest


def test_synth_writes_shards_and_a_manifest(tmp_path, capsys):
    out = tmp_path / "synth"
    assert cli.main(["synth", "--out", str(out), "--samples", "40", "--shards", "4", "--resolution", "16",
                     "--corrupt", "bad_json=1,missing_txt=1", "--fail", "aesthetic=0.25"]) == 0
    assert sorted(p.name for p in out.glob("*.tar")) == [f"0000{i}.tar" for i in range(4)]
    manifest = read_manifest(out)
    assert manifest["expected"]["filtered_aesthetic"] == 10 and manifest["expected"]["bad_json"] == 1
    assert "a reader with the filter should count" in capsys.readouterr().out


def test_inspect_reports_the_designed_pass_rate_and_skips(broken_shards, tmp_path, capsys):
    folder, manifest = broken_shards
    report_file = tmp_path / "report.json"
    assert cli.main(["inspect", str(folder), "--json", str(report_file)]) == 0
    report = json.loads(report_file.read_text())
    expected = manifest["expected"]
    assert report["samples_read"] == expected["samples_read"]
    assert report["skipped"]["bad_json"] == expected["bad_json"]
    assert report["skipped"]["truncated_tar"] == 1
    # inspect decodes no pixels, so the truncated JPEGs are still among the passing samples
    assert report["filter"]["passed"] == expected["samples_accepted"] + expected["undecodable_image"]
    assert report["filter"]["rejected_by_first_rule"]["size"] == expected["filtered_size"]
    assert sum(report["histograms"]["caption_words"].values()) == report["filter"]["checked"]
    text = capsys.readouterr().out
    assert "passed" in text and "caption_words:" in text and "#" in text


def test_another_package_can_register_a_subcommand(capsys, monkeypatch):
    monkeypatch.setattr(cli, "SUBCOMMANDS", dict(cli.SUBCOMMANDS))
    cli.register_subcommand(cli.Subcommand(
        "toy-prompts", "build a toy prompt set",
        lambda parser: parser.add_argument("--count", type=int, default=30000),
        lambda args: print(f"would build {args.count} prompts")))
    assert cli.main(["toy-prompts", "--count", "5"]) == 0
    assert "would build 5 prompts" in capsys.readouterr().out


def test_an_unknown_filter_file_is_a_clear_error():
    with pytest.raises(SystemExit, match="is not 'laion', 'none' or an existing yaml file"):
        cli.load_filter("no/such/filter.yaml")


def test_the_data_package_imports_neither_models_nor_train_nor_eval():
    package = Path(cli.__file__).parent
    for source in package.glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                assert name.split(".")[0] not in {"models", "train", "eval"}, f"{source.name} imports {name}"
