"""Pushing to the Hub, tested against huggingface_hub's real client up to the HTTP boundary.

A loopback server (tests/hub/fake_hub.py) answers like the Hub API. The subprocess tests point the
client at it the way a user would, with ``HF_ENDPOINT`` and ``HF_TOKEN`` in the environment, and run the
console entry point (``python -m wurst.models.hub.cli``).

Exercised: create_repo (visibility), create_branch (revision), the README metadata check
(validate-yaml), preupload (upload modes), the git-LFS batch API with PUT uploads and verify, and the
NDJSON commit — through ``HfApi.upload_folder`` both ways it can run here: the legacy create_commit
path (``HF_HUB_DISABLE_XET=1``, large files over LFS) and the default streamed pipeline of an install
with ``hf_xet`` (files answered "regular", so they travel base64 in the commit). Not exercised: the
Xet storage transfer itself (hf_xet's Rust client and the CAS protocol), multipart LFS uploads, pull
requests, retries after server errors, and the real Hub's authorisation and metadata-schema checks.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from wurst.models.hub.cli import main

REPO = Path(__file__).resolve().parents[2]
TOKEN = "hf_FakeTokenForTheLoopbackHub0123456789"
REPO_ID = "someone/wurst-tiny"


def run_cli(
    args: list[str], hub, tmp_path: Path, xet: bool, token: str | None = TOKEN
) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE"))}
    env.update(
        HF_ENDPOINT=hub.url,
        HF_HOME=str(tmp_path / "hf_home"),  # no stored login: the token comes from HF_TOKEN only
        HF_HUB_OFFLINE="0",
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
    )
    if token is not None:
        env["HF_TOKEN"] = token
    if not xet:
        env["HF_HUB_DISABLE_XET"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "wurst.models.hub.cli", *args],
        check=False,
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def local_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def only_commit(hub):
    commits = hub.calls("POST", r"/api/models/someone/wurst-tiny/commit/[^/]+")
    assert len(commits) == 1, [r.path for r in hub.requests]
    return commits[0]


@pytest.fixture
def no_token(monkeypatch, tmp_path):
    """No HF_TOKEN and no stored login (for in-process calls)."""
    from huggingface_hub import constants

    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no_login" / "token"))


# ----- no token: a clear error before any request, and no folder -----------------------------------
def test_export_with_push_and_no_token_fails_before_writing_or_uploading(
    no_token, fake_hub, tiny_pipeline_dir, tmp_path, capsys
):
    out = tmp_path / "out"
    code = main([str(tiny_pipeline_dir), f"out={out}", "push=true", f"repo_id={REPO_ID}"])
    assert code == 1
    assert "push=true needs a Hugging Face token" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # no export, no partial folder
    assert fake_hub.requests == []  # not a single request


def test_push_command_without_token_names_both_ways_to_provide_one(no_token, exported_folder, capsys):
    assert main(["push", str(exported_folder), f"repo_id={REPO_ID}"]) == 1
    error = capsys.readouterr().err
    assert "HF_TOKEN" in error and "hf auth login" in error and "Nothing was uploaded" in error


def test_push_needs_an_owner_and_name(capsys):
    assert main(["push", "somewhere", "repo_id=justaname"]) == 1
    assert "repo_id=<owner>/<name>" in capsys.readouterr().err


# ----- uploads through the real client ------------------------------------------------------------
def test_push_uploads_every_file_over_lfs_and_commit_to_the_revision(fake_hub, exported_folder, tmp_path):
    result = run_cli(
        ["push", str(exported_folder), f"repo_id={REPO_ID}", "private=true", "revision=v1"],
        fake_hub,
        tmp_path,
        xet=False,
    )
    assert result.returncode == 0, result.stderr
    create = fake_hub.calls("POST", "/api/repos/create")[0].json()
    assert (create["organization"], create["name"], create["visibility"]) == (
        "someone",
        "wurst-tiny",
        "private",
    )
    assert fake_hub.calls("POST", "/api/models/someone/wurst-tiny/branch/v1")
    validated = fake_hub.calls("POST", "/api/validate-yaml")[0].json()["content"]
    assert validated == (exported_folder / "README.md").read_text()

    files = local_files(exported_folder)
    weights = {path: data for path, data in files.items() if path.endswith(".safetensors")}
    assert {hashlib.sha256(d).hexdigest() for d in weights.values()} == set(fake_hub.lfs_objects)
    commit = only_commit(fake_hub)
    assert commit.path.startswith("/api/models/someone/wurst-tiny/commit/v1")
    committed = commit.committed_files()
    assert set(committed) == set(files)  # every file of the export, nothing else
    for path, data in files.items():
        if path in weights:
            assert committed[path]["key"] == "lfsFile"
            assert committed[path]["oid"] == hashlib.sha256(data).hexdigest() and committed[path][
                "size"
            ] == len(data)
        else:
            assert committed[path]["bytes"] == data
    # The token authenticates every API call and is never printed.
    api_calls = [r for r in fake_hub.requests if r.path.startswith("/api/")]
    assert api_calls and all(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in api_calls)
    assert TOKEN not in result.stdout + result.stderr
    assert fake_hub.unanswered() == []
    assert result.stdout.strip().endswith(
        f"/someone/wurst-tiny/commit/{hashlib.sha1(commit.body).hexdigest()}"
    )


def test_push_with_hf_xet_installed_runs_the_streamed_upload_pipeline(fake_hub, exported_folder, tmp_path):
    fake_hub.lfs_suffixes = ()  # every file "regular": no Xet transfer needed (the CAS side cannot be faked)
    result = run_cli(["push", str(exported_folder), f"repo_id={REPO_ID}"], fake_hub, tmp_path, xet=True)
    assert result.returncode == 0, result.stderr
    assert fake_hub.calls("POST", "/api/repos/create")[0].json().get("visibility") == "public"
    committed = only_commit(fake_hub).committed_files()
    files = local_files(exported_folder)
    assert set(committed) == set(files) and all(committed[p]["bytes"] == d for p, d in files.items())
    assert only_commit(fake_hub).path.startswith("/api/models/someone/wurst-tiny/commit/main")
    assert TOKEN not in result.stdout + result.stderr and fake_hub.unanswered() == []


@pytest.mark.slow
def test_export_with_push_true_exports_then_uploads_the_same_folder(fake_hub, tiny_pipeline_dir, tmp_path):
    out = tmp_path / "out"
    result = run_cli(
        [str(tiny_pipeline_dir), f"out={out}", "push=true", f"repo_id={REPO_ID}"],
        fake_hub,
        tmp_path,
        xet=False,
    )
    assert result.returncode == 0, result.stderr
    assert (out / "model_index.json").is_file()
    assert set(only_commit(fake_hub).committed_files()) == set(local_files(out))
    assert TOKEN not in result.stdout + result.stderr


def test_a_refused_upload_keeps_the_export_and_says_how_to_retry(
    fake_hub, exported_folder, monkeypatch, capsys
):
    from huggingface_hub import constants

    fake_hub.refuse_commit = 403
    monkeypatch.setattr(constants, "ENDPOINT", fake_hub.url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert main(["push", str(exported_folder), f"repo_id={REPO_ID}"]) == 1
    error = capsys.readouterr().err
    assert "403" in error and f"upload to {REPO_ID} failed" in error and TOKEN not in error
    assert (exported_folder / "model_index.json").is_file()
