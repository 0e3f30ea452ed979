"""The COCO-30K builder: seeded, documented choice; reference preprocessing; clear errors; resume."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from wurst.eval.coco30k import SUBCOMMAND, build_coco30k, main, read_coco_captions, select_coco_prompts
from wurst.eval.prompt_set import read_prompt_file


def build(fake_coco, out, **kwargs):
    kwargs = {"n": 8, "seed": 0, "resolution": 32, "workers": 2, "progress": False, **kwargs}
    return build_coco30k(fake_coco["annotations"], fake_coco["images"], out, **kwargs)


def test_same_seed_gives_the_same_ids_and_captions(fake_coco, tmp_path):
    first = read_prompt_file(build(fake_coco, tmp_path / "a") / "prompts.jsonl")
    second = read_prompt_file(build(fake_coco, tmp_path / "b") / "prompts.jsonl")
    assert [(r.id, r.caption) for r in first] == [(r.id, r.caption) for r in second]


def test_another_seed_gives_another_choice(fake_coco):
    coco = read_coco_captions(fake_coco["annotations"])
    choices = {tuple(r.image_id for r in select_coco_prompts(coco, 6, seed)) for seed in range(4)}
    assert len(choices) > 1


def test_a_smaller_n_is_a_subset_of_a_larger_one(fake_coco):
    coco = read_coco_captions(fake_coco["annotations"])
    small = {(r.image_id, r.caption) for r in select_coco_prompts(coco, 4, seed=3)}
    large = {(r.image_id, r.caption) for r in select_coco_prompts(coco, 10, seed=3)}
    assert small < large


def test_one_stripped_caption_per_distinct_image_in_ascending_id_order(fake_coco):
    coco = read_coco_captions(fake_coco["annotations"])
    records = select_coco_prompts(coco, 12, seed=0)
    image_ids = [r.image_id for r in records]
    assert image_ids == sorted(set(image_ids)) and len(image_ids) == 12
    by_image = {}
    for annotation in coco["annotations"]:
        by_image.setdefault(annotation["image_id"], []).append(annotation["caption"].strip())
    assert all(r.caption in by_image[r.image_id] and r.caption == r.caption.strip() for r in records)
    assert [r.id for r in records] == [f"{i:012d}" for i in image_ids]


def test_images_without_a_non_empty_caption_are_not_eligible(fake_coco):
    coco = read_coco_captions(fake_coco["annotations"])
    with pytest.raises(ValueError, match="only 12 images with captions"):
        select_coco_prompts(coco, 13)


def test_writes_prompts_square_png_references_and_manifest(fake_coco, tmp_path):
    out = build(fake_coco, tmp_path / "set", resolution=40)
    records = read_prompt_file(out / "prompts.jsonl")
    assert len(records) == 8
    first = json.loads((out / "prompts.jsonl").read_text().splitlines()[0])
    assert set(first) == {"id", "image_id", "caption"}
    for record in records:
        with Image.open(out / "references" / f"{record.id}.png") as image:
            assert (image.format, image.mode, image.size) == ("PNG", "RGB", (40, 40))
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["n"], manifest["seed"], manifest["resolution"]) == (8, 0, 40)
    assert "sha256" in manifest["selection"] and "centre crop" in manifest["preprocessing"]


def test_missing_fields_are_named(fake_coco, tmp_path):
    coco = json.loads(fake_coco["annotations"].read_text())
    del coco["images"][2]["file_name"]
    del coco["annotations"][5]["caption"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(coco))
    with pytest.raises(ValueError, match=r"images\[2\] lacks 'file_name'.*annotations\[5\] lacks 'caption'"):
        build_coco30k(bad, fake_coco["images"], tmp_path / "out", n=4, progress=False)


def test_a_file_without_annotations_is_named(tmp_path):
    bad = tmp_path / "instances.json"
    bad.write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match=r"lacks the list\(s\) \['annotations'\]"):
        read_coco_captions(bad)


def test_missing_image_files_are_named_before_anything_is_written(fake_coco, tmp_path):
    coco = read_coco_captions(fake_coco["annotations"])
    chosen = select_coco_prompts(coco, 8, seed=0)
    victim = next(e["file_name"] for e in coco["images"] if e["id"] == chosen[3].image_id)
    (fake_coco["images"] / victim).unlink()
    with pytest.raises(FileNotFoundError, match=f"lacks 1 of the 8 chosen images \\({victim}\\)"):
        build(fake_coco, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_rebuilding_keeps_finished_references(fake_coco, tmp_path):
    out = build(fake_coco, tmp_path / "set")
    kept = min((out / "references").iterdir())
    kept.write_bytes(kept.read_bytes())  # same content, a new mtime we can recognise
    stamp = kept.stat().st_mtime_ns
    (sorted((out / "references").iterdir())[1]).unlink()
    build(fake_coco, out)
    assert kept.stat().st_mtime_ns == stamp
    assert len(list((out / "references").iterdir())) == 8


def test_rebuilding_with_other_settings_into_the_same_folder_is_refused(fake_coco, tmp_path):
    out = build(fake_coco, tmp_path / "set")
    with pytest.raises(FileExistsError, match="other settings"):
        build(fake_coco, out, resolution=64)


def test_command_line_builds_the_set(fake_coco, tmp_path, capsys):
    code = main(
        [
            "--annotations",
            str(fake_coco["annotations"]),
            "--images",
            str(fake_coco["images"]),
            "--out",
            str(tmp_path / "cli"),
            "--n",
            "5",
            "--resolution",
            "24",
            "--no-progress",
        ]
    )
    assert code == 0 and len(read_prompt_file(tmp_path / "cli" / "prompts.jsonl")) == 5
    assert "5 prompts" in capsys.readouterr().out


def test_is_a_wurst_data_subcommand(fake_coco, tmp_path, monkeypatch):
    from wurst.data.cli import SUBCOMMANDS
    from wurst.data.cli import main as wurst_data

    # As the entry point "wurst.data_subcommands: coco30k = eval.coco30k:SUBCOMMAND" registers it;
    # monkeypatch takes it out again so other areas' tests see wurst-data's own registry.
    monkeypatch.setitem(SUBCOMMANDS, "coco30k", SUBCOMMAND)
    wurst_data(
        [
            "coco30k",
            "--annotations",
            str(fake_coco["annotations"]),
            "--images",
            str(fake_coco["images"]),
            "--out",
            str(tmp_path / "wd"),
            "--n",
            "3",
            "--resolution",
            "16",
            "--no-progress",
        ]
    )
    assert len(read_prompt_file(tmp_path / "wd" / "prompts.jsonl")) == 3
