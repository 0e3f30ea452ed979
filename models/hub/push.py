"""Upload an exported folder to the Hugging Face Hub with huggingface_hub's client.

The token comes from where huggingface_hub looks for it (``HF_TOKEN``, then the file ``hf auth login``
writes under ``HF_HOME``); it is handed to ``HfApi`` and never printed, logged or put in an error.
``HF_ENDPOINT`` (read by huggingface_hub) points the client at another Hub, e.g. a private mirror.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


class MissingTokenError(PermissionError):
    """No Hugging Face token is available for an upload."""


@dataclass(frozen=True)
class PushResult:
    repo_url: str
    commit_url: str
    revision: str


def check_repo_id(repo_id: str | None) -> str:
    if not repo_id or not isinstance(repo_id, str) or not REPO_ID.match(repo_id):
        raise ValueError(
            f"repo_id={repo_id!r}: pushing needs repo_id=<owner>/<name> (your user or organisation, then the model name)"
        )
    return repo_id


def resolve_token() -> str:
    """The Hugging Face token huggingface_hub would use; raises :class:`MissingTokenError` when there is none."""
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise MissingTokenError(
            "push=true needs a Hugging Face token with write access, and none was found: set the HF_TOKEN environment "
            "variable or run `hf auth login` (tokens: https://huggingface.co/settings/tokens). Nothing was uploaded."
        )
    return token


def push_folder(
    folder: str | Path,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    revision: str | None = None,
    commit_message: str = "Upload Würstchen cascade exported with wurst",
    endpoint: str | None = None,
) -> PushResult:
    """Create ``repo_id`` (if needed; ``private`` applies only to a new repository), create the branch
    ``revision`` (if given and missing), and upload every file of ``folder`` in one commit series.

    The token is resolved first (:func:`resolve_token`), so a missing token fails before any request.
    """
    from huggingface_hub import HfApi

    folder = Path(folder)
    repo_id = check_repo_id(repo_id)
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(
            f"{folder} is not an exported folder (no model_index.json); export first: `wurst-export <pipeline_dir> out={folder}`"
        )
    token = token or resolve_token()
    api = HfApi(endpoint=endpoint, token=token)
    repo_url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    if revision and revision != "main":
        api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
    log.info(
        "uploading %s to %s (revision %s, %s)",
        folder,
        repo_id,
        revision or "main",
        "private" if private else "public",
    )
    commit = api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        repo_type="model",
        revision=revision,
        commit_message=commit_message,
    )
    log.info("pushed: %s", commit.commit_url)
    return PushResult(repo_url=str(repo_url), commit_url=str(commit.commit_url), revision=revision or "main")
