"""``wurst-export``: pipeline directory ⇄ diffusers layout, and upload to the Hugging Face Hub.

    wurst-export <pipeline_dir> out=<dir> [push=true repo_id=<owner>/<name> private=true revision=<branch>]
                 [overwrite=true dtype=float32|float16|bfloat16 license=mit model_name=... datasets=<id>,<id>]
    wurst-export import <diffusers_dir_or_hub_id> out=<pipeline_dir> [prior=<dir_or_id>] [revision=...]
                 [overwrite=true dtype=float32]
    wurst-export import <dir with the released .pt files> out=<pipeline_dir> [stage_a=paper stage_b=paper
                 stage_c=paper compressor=paper text_encoder_b=paper_clip_h text_encoder_c=paper] [overwrite=true]
                 (vqgan_f4_v1_500k.pt, model_v2_stage_b.pt with the compressor, model_v3_stage_c.pt; each
                 config is a conf/model/<part>/<name>.yaml name or a yaml path; the text encoder configs name
                 their pretrained weights, e.g. a local open_clip checkpoint on an offline cluster)
    wurst-export push <exported_dir> repo_id=<owner>/<name> [private=true revision=<branch>]

Exporting with ``push=true`` resolves the token (``HF_TOKEN`` or ``hf auth login``) before anything is
written, exports, then uploads; a failed upload leaves the complete export for ``wurst-export push``.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger("wurst-export")

TRUE, FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}
# Importing the released .pt files: option → (conf/model group, default config). The checkpoints hold no
# configs, so the networks are the paper's unless told otherwise.
OFFICIAL_CONFIGS = {
    "stage_a": ("stage_a", "paper"),
    "stage_b": ("stage_b", "paper"),
    "stage_c": ("stage_c", "paper"),
    "compressor": ("compressor", "paper"),
    "text_encoder_b": ("text_encoder", "paper_clip_h"),
    "text_encoder_c": ("text_encoder", "paper"),
}
# The repository's conf/ (models/ must not import train, which names the same folder for Hydra).
CONF_MODEL_DIR = Path(__file__).resolve().parents[2] / "conf" / "model"
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
    "import": {"out", "prior", "revision", "overwrite", "dtype", *OFFICIAL_CONFIGS},
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


def official_config(part: str, name_or_path: str | None) -> dict[str, Any]:
    """The constructor config for one part of an official import: a conf/model name or a yaml path."""
    from omegaconf import OmegaConf

    group, default = OFFICIAL_CONFIGS[part]
    path = Path(name_or_path) if name_or_path else CONF_MODEL_DIR / group / f"{default}.yaml"
    if not path.is_file():
        path = CONF_MODEL_DIR / group / f"{name_or_path}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (CONF_MODEL_DIR / group).glob("*.yaml"))
        raise UsageError(f"{part}={name_or_path!r} is neither a yaml file nor one of conf/model/{group}: {known}")
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)


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
        from wurst.models.hub.diffusers_import import DTYPES, import_diffusers
        from wurst.models.hub.official_import import has_official_checkpoints, import_official

        if has_official_checkpoints(positional):
            if options.get("prior") or options.get("revision"):
                raise UsageError("prior= and revision= apply to diffusers folders, not to the released .pt files")
            configs = {part: official_config(part, options.get(part)) for part in OFFICIAL_CONFIGS}
            dtype = options.get("dtype", "float32")
            if dtype not in DTYPES:
                raise UsageError(f"dtype={dtype!r}: use one of {sorted(DTYPES)}")
            return import_official(
                positional, options["out"], configs=configs, overwrite=options.get("overwrite", False),
                dtype=DTYPES[dtype],
            )
        given = sorted(set(options) & set(OFFICIAL_CONFIGS))
        if given:
            raise UsageError(
                f"{given} apply to a folder of the released .pt files; {positional} is a diffusers folder or Hub "
                "id, whose configs come with it"
            )
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
