"""COCO-30K: the prompt set and reference images of the paper's zero-shot evaluation.

REFERENCE.md "Evaluation (COCO-30K)": 30,000 captions from MS-COCO 2014 validation, one per image.
From a local ``captions_val2014.json`` and ``val2014/`` folder this writes::

    <out>/prompts.jsonl          {"id": "000000397133", "image_id": 397133, "caption": "..."} per line
    <out>/references/<id>.png    the image, resized (short side) + centre-cropped to resolution², PNG
    <out>/manifest.json          source, its sha256, n, seed, resolution and the rules below

The choice, documented so another implementation can reproduce it exactly:
- eligible images: those with at least one non-empty caption;
- images are ranked by sha256("<seed>:<image_id>") and the first ``n`` are taken, so the same seed
  gives the same ids on any machine and Python, and a smaller ``n`` is a subset of a larger one;
- each image's caption is the one whose annotation id has the smallest sha256("<seed>:<annotation_id>");
  captions are whitespace-stripped (COCO's carry trailing spaces and newlines);
- prompts are written in ascending image id; an image's id is its COCO id zero-padded to 12 digits
  (the number in COCO's file names).
Reference preprocessing: :func:`eval.image_folder.resize_center_crop` (RGB, bicubic antialiased
resize of the short side, centre crop) at ``resolution`` (default 256, the usual COCO FID side;
512 is also common). ``wurst-eval`` puts the generated images through the same function.
Re-running into the same folder resumes: finished reference PNGs are kept.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from wurst.data.cli import Subcommand
from wurst.eval.image_folder import load_rgb, resize_center_crop, write_png_atomic
from wurst.eval.prompt_set import PromptRecord, write_prompt_file

COCO30K_SIZE = 30_000  # REFERENCE.md "Evaluation (COCO-30K)": 30,000 captions, one per image
DEFAULT_RESOLUTION = 256
SELECTION_RULE = (
    "images with >= 1 non-empty caption ranked by sha256('<seed>:<image_id>'), first n; caption = the "
    "annotation with the smallest sha256('<seed>:<annotation_id>'), whitespace-stripped"
)
PREPROCESSING_RULE = "RGB; short side resized to resolution (PIL bicubic, antialiased); centre crop; PNG"


def _rank(seed: int, key: int) -> str:
    return hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()


def read_coco_captions(path: str | Path) -> dict[str, Any]:
    """Load and validate a COCO captions file; errors name the entries and fields that are missing."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"COCO captions file {path} does not exist; download annotations_trainval2014.zip from "
            "cocodataset.org and pass its annotations/captions_val2014.json"
        )
    try:
        coco = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"COCO captions file {path} is not valid JSON ({error})") from error
    if not isinstance(coco, dict):
        raise TypeError(f"COCO captions file {path} must hold a JSON object with 'images' and 'annotations'")
    missing_top = [key for key in ("images", "annotations") if not isinstance(coco.get(key), list)]
    if missing_top:
        raise ValueError(
            f"COCO captions file {path} lacks the list(s) {missing_top}; is it captions_val2014.json "
            "(not instances_* or a results file)?"
        )
    problems = []
    for section, fields in (("images", ("id", "file_name")), ("annotations", ("id", "image_id", "caption"))):
        for index, entry in enumerate(coco[section]):
            absent = [f for f in fields if not isinstance(entry, dict) or f not in entry]
            if absent:
                problems.append(f"{section}[{index}] lacks {', '.join(repr(f) for f in absent)}")
    if problems:
        shown = "; ".join(problems[:5]) + (
            f"; ... ({len(problems)} entries in all)" if len(problems) > 5 else ""
        )
        raise ValueError(f"COCO captions file {path} has entries with missing fields: {shown}")
    image_ids = {entry["id"] for entry in coco["images"]}
    orphans = [a["id"] for a in coco["annotations"] if a["image_id"] not in image_ids]
    if orphans:
        raise ValueError(
            f"COCO captions file {path}: {len(orphans)} annotations name images not in 'images' "
            f"(annotation ids {orphans[:5]}); the file is inconsistent, re-download it"
        )
    return coco


def select_coco_prompts(coco: dict[str, Any], n: int = COCO30K_SIZE, seed: int = 0) -> list[PromptRecord]:
    """The seeded choice of ``n`` images with one caption each (rules in the module docstring)."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be a positive int (number of images), got {n!r}")
    captions: dict[int, list[tuple[str, str]]] = {}
    for annotation in coco["annotations"]:
        caption = str(annotation["caption"]).strip()
        if caption:
            captions.setdefault(int(annotation["image_id"]), []).append(
                (_rank(seed, annotation["id"]), caption)
            )
    if n > len(captions):
        raise ValueError(
            f"n={n} but the COCO file has only {len(captions)} images with captions; "
            f"pass --n {len(captions)} "
            "or fewer"
        )
    chosen = sorted(sorted(captions, key=lambda image_id: _rank(seed, image_id))[:n])
    return [
        PromptRecord(index=i, id=f"{image_id:012d}", caption=min(captions[image_id])[1], image_id=image_id)
        for i, image_id in enumerate(chosen)
    ]


def build_coco30k(
    annotations: str | Path,
    images_dir: str | Path,
    out_dir: str | Path,
    n: int = COCO30K_SIZE,
    seed: int = 0,
    resolution: int = DEFAULT_RESOLUTION,
    workers: int = 4,
    progress: bool = True,
) -> Path:
    """Write ``prompts.jsonl``, ``references/`` and ``manifest.json`` under ``out_dir``; returns it."""
    if not isinstance(resolution, int) or resolution < 8:
        raise ValueError(f"resolution must be an int ≥ 8 (pixels, e.g. 256 or 512), got {resolution!r}")
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive int, got {workers!r}")
    annotations, images_dir, out_dir = Path(annotations), Path(images_dir), Path(out_dir)
    coco = read_coco_captions(annotations)
    records = select_coco_prompts(coco, n, seed)
    if not images_dir.is_dir():
        raise FileNotFoundError(
            f"COCO image folder {images_dir} does not exist; pass the unpacked val2014/ folder"
        )
    file_names = {int(entry["id"]): entry["file_name"] for entry in coco["images"]}
    sources = {r.id: images_dir / file_names[r.image_id] for r in records}
    missing = [str(path.name) for path in sources.values() if not path.is_file()]
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise FileNotFoundError(
            f"COCO image folder {images_dir} lacks {len(missing)} of the {len(records)} chosen images "
            f"({shown}); "
            "is it the complete val2014/ folder of the same COCO release as the captions file?"
        )

    manifest = {
        "source": str(annotations),
        "source_sha256": hashlib.sha256(annotations.read_bytes()).hexdigest(),
        "n": n,
        "seed": seed,
        "resolution": resolution,
        "selection": SELECTION_RULE,
        "preprocessing": PREPROCESSING_RULE,
    }
    manifest_path = out_dir / "manifest.json"
    if manifest_path.is_file():
        previous = json.loads(manifest_path.read_text())
        if any(previous.get(key) != manifest[key] for key in ("source_sha256", "n", "seed", "resolution")):
            raise FileExistsError(
                f"{out_dir} already holds a COCO-30K build with other settings ({manifest_path}); "
                "choose a new --out or delete that folder"
            )
    references = out_dir / "references"
    references.mkdir(parents=True, exist_ok=True)

    def write_reference(record: PromptRecord) -> None:
        target = references / f"{record.id}.png"
        if target.is_file():
            return  # resume: written atomically, so an existing file is complete
        write_png_atomic(resize_center_crop(load_rgb(sources[record.id]), resolution), target)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        jobs = pool.map(write_reference, records)
        for _ in tqdm(jobs, total=len(records), desc="coco30k references", disable=not progress):
            pass
    write_prompt_file(out_dir / "prompts.jsonl", records)
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    return out_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``wurst-data coco30k`` arguments."""
    parser.add_argument("--annotations", required=True, help="captions_val2014.json of MS-COCO 2014")
    parser.add_argument("--images", required=True, help="the val2014/ image folder")
    parser.add_argument(
        "--out", required=True, help="output folder (prompts.jsonl, references/, manifest.json)"
    )
    parser.add_argument(
        "--n", type=int, default=COCO30K_SIZE, help=f"images, one caption each ({COCO30K_SIZE})"
    )
    parser.add_argument("--seed", type=int, default=0, help="selection seed (default 0)")
    parser.add_argument(
        "--resolution",
        type=int,
        default=DEFAULT_RESOLUTION,
        help=f"reference side in pixels after resize + centre crop ({DEFAULT_RESOLUTION})",
    )
    parser.add_argument("--workers", type=int, default=4, help="decode/resize threads (default 4)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Build the set from parsed :func:`add_arguments` arguments; prints where it went."""
    out = build_coco30k(
        args.annotations,
        args.images,
        args.out,
        n=args.n,
        seed=args.seed,
        resolution=args.resolution,
        workers=args.workers,
        progress=not args.no_progress,
    )
    print(f"COCO-30K: {args.n} prompts in {out / 'prompts.jsonl'}, references in {out / 'references'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m wurst.eval.coco30k --annotations ... --images ... --out ...``."""
    parser = argparse.ArgumentParser(
        prog="coco30k", description="Build the COCO-30K prompt and reference set."
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


# The entry point `wurst-data` looks up (group "wurst.data_subcommands": coco30k = "eval.coco30k:SUBCOMMAND").
SUBCOMMAND = Subcommand("coco30k", "build the COCO-30K prompt file and reference images", add_arguments, run)


if __name__ == "__main__":
    raise SystemExit(main())
