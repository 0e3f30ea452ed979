"""`wurst-export` command lines: what is accepted, and the errors for what is not."""

from __future__ import annotations

import pytest

from wurst.models.hub.cli import main, parse


def test_export_is_the_default_command_with_key_value_options():
    command, source, options = parse(
        [
            "outputs/tiny",
            "out=hub/tiny",
            "push=true",
            "repo_id=me/tiny",
            "private=yes",
            "datasets=laion/a,laion/b",
        ]
    )
    assert (command, source) == ("export", "outputs/tiny")
    assert options == {
        "out": "hub/tiny",
        "push": True,
        "repo_id": "me/tiny",
        "private": True,
        "datasets": ["laion/a", "laion/b"],
    }


def test_import_and_push_are_subcommands():
    assert parse(["import", "warp-ai/wuerstchen", "out=o", "prior=warp-ai/wuerstchen-prior"])[:2] == (
        "import",
        "warp-ai/wuerstchen",
    )
    assert parse(["push", "hub/tiny", "repo_id=me/tiny", "revision=v1"])[2] == {
        "repo_id": "me/tiny",
        "revision": "v1",
    }


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["outputs/tiny"], "needs out=<dir>"),
        (["outputs/tiny", "out=o", "colour=red"], "unknown option 'colour'"),
        (["outputs/tiny", "other", "out=o"], "exactly one <pipeline_dir>"),
        (["outputs/tiny", "out=o", "push=maybe"], "push='maybe': use true or false"),
        (["outputs/tiny", "out=o", "private=true"], "only apply with push=true"),
        (["import", "src", "out=o", "repo_id=me/x"], "unknown option 'repo_id'"),
        ([], "no arguments"),
    ],
)
def test_bad_command_lines_exit_2_with_the_reason(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_help_prints_the_usage(capsys):
    assert main(["--help"]) == 0
    assert "wurst-export import <diffusers_dir_or_hub_id> out=<pipeline_dir>" in capsys.readouterr().out


def test_a_missing_pipeline_directory_is_an_error_not_a_traceback(tmp_path, capsys):
    assert main([str(tmp_path / "nope"), f"out={tmp_path / 'out'}"]) == 1
    assert "pipeline directory" in capsys.readouterr().err and not (tmp_path / "out").exists()
