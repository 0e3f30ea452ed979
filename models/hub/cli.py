"""``wurst-export``: pipeline directory ⇄ diffusers layout, and upload to the Hugging Face Hub.

    wurst-export <pipeline_dir> out=<dir> [push=true repo_id=<owner>/<name> private=true revision=<branch>]
                 [overwrite=true dtype=float32|float16|bfloat16 license=mit model_name=... datasets=<id>,<id>]
    wurst-export import <diffusers_dir_or_hub_id> out=<pipeline_dir> [prior=<dir_or_id>] [revision=...]
                 [overwrite=true dtype=float32]
    wurst-export push <exported_dir> repo_id=<owner>/<name> [private=true revision=<branch>]

Exporting with ``push=true`` resolves the token (``HF_TOKEN`` or ``hf auth login``) before anything is
written, exports, then uploads; a failed upload leaves the complete export for ``wurst-export push``.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from typing import Any

log = logging.getLogger("wurst-export")

TRUE, FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}
OPTIONS = {
    "export": {
        "out",
        "push",
        "repo_id",
        "private",
        "revision",
        "overwrite",
        "dtype",
        "license",
        "model_name",
        "datasets",
    },
    "import": {"out", "prior", "revision", "overwrite", "dtype"},
    "push": {"repo_id", "private", "revision"},
}
BOOLEANS = {"push", "private", "overwrite"}


class UsageError(ValueError):
    """A command line that cannot be run as written."""


def parse(argv: Sequence[str]) -> tuple[str, str, dict[str, Any]]:
    """argv → (command, positional argument, options); ``key=value`` options, checked per command."""
    args = list(argv)
    if not args:
        raise UsageError("no arguments; see `wurst-export --help`")
    command = args.pop(0) if args[0] in ("import", "push") else "export"
    positional = [a for a in args if "=" not in a]
    if len(positional) != 1:
        what = {"export": "<pipeline_dir>", "import": "<diffusers_dir_or_hub_id>", "push": "<exported_dir>"}[
            command
        ]
        raise UsageError(
            f"wurst-export {command if command != 'export' else ''} needs exactly one {what}, got {positional}"
        )
    options: dict[str, Any] = {}
    for item in (a for a in args if "=" in a):
        key, value = item.split("=", 1)
        key = key.lstrip("-").replace("-", "_")
        if key not in OPTIONS[command]:
            raise UsageError(
                f"unknown option {key!r} for `wurst-export {command}`; known: {sorted(OPTIONS[command])}"
            )
        if key in BOOLEANS:
            if value.lower() not in TRUE | FALSE:
                raise UsageError(f"{key}={value!r}: use true or false")
            value = value.lower() in TRUE
        elif key == "datasets":
            value = [d for d in value.split(",") if d]
        options[key] = value
    if command in ("export", "import") and "out" not in options:
        raise UsageError(f"`wurst-export {command}` needs out=<dir> (where to write)")
    if (
        command == "export"
        and not options.get("push")
        and any(k in options for k in ("private", "revision", "repo_id"))
    ):
        raise UsageError("repo_id=, private= and revision= only apply with push=true")
    return command, positional[0], options


def run(command: str, positional: str, options: dict[str, Any]) -> Any:
    from huggingface_hub.errors import HfHubHTTPError

    from wurst.models.hub.push import check_repo_id, push_folder, resolve_token

    if command == "push":
        check_repo_id(options.get("repo_id"))
        token = resolve_token()
        try:
            return push_folder(
                positional,
                options["repo_id"],
                token=token,
                private=options.get("private", False),
                revision=options.get("revision"),
            )
        except HfHubHTTPError as error:
            raise RuntimeError(f"upload to {options['repo_id']} failed: {error}") from error
    if command == "import":
        from wurst.models.hub.diffusers_import import import_diffusers

        return import_diffusers(
            positional,
            options["out"],
            prior=options.get("prior"),
            revision=options.get("revision"),
            overwrite=options.get("overwrite", False),
            dtype=options.get("dtype", "float32"),
        )

    from wurst.models.hub.diffusers_export import export_pipeline

    push = options.get("push", False)
    token = None
    if push:
        check_repo_id(options.get("repo_id"))
        token = resolve_token()  # before any work: no token, no export, no upload
    out = export_pipeline(
        positional,
        options["out"],
        overwrite=options.get("overwrite", False),
        dtype=options.get("dtype", "float32"),
        model_name=options.get("model_name"),
        repo_id=options.get("repo_id"),
        license=options.get("license", "mit"),
        datasets=options.get("datasets"),
    )
    if not push:
        return out
    try:
        return push_folder(
            out,
            options["repo_id"],
            token=token,
            private=options.get("private", False),
            revision=options.get("revision"),
        )
    except Exception as error:
        raise RuntimeError(
            f"the export at {out} is complete but the upload failed ({type(error).__name__}: {error}); retry with "
            f"`wurst-export push {out} repo_id={options['repo_id']}`"
        ) from error


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] in (["-h"], ["--help"]):
        print(__doc__)
        return 0
    try:
        command, positional, options = parse(args)
    except UsageError as error:
        print(f"wurst-export: {error}", file=sys.stderr)
        return 2
    from wurst.models.hub.push import MissingTokenError

    try:
        result = run(command, positional, options)
    except (MissingTokenError, FileNotFoundError, FileExistsError, ValueError, RuntimeError) as error:
        # The messages name the input, what was wrong and what to do; a traceback adds nothing.
        print(f"wurst-export: error: {error}", file=sys.stderr)
        return 1
    print(result.commit_url if hasattr(result, "commit_url") else result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
