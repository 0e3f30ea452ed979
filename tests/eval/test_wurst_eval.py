"""wurst-eval end to end: score an image folder against prompts; generate from a tiny pipeline first."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir

from wurst.eval.evaluate import evaluate
from wurst.eval.prompt_set import PromptRecord, read_prompt_file, write_prompt_file

from .conftest import COLOURS, CONF, caption_of, colour_image

REPO = CONF.parent


@pytest.fixture
def colour_set(tmp_path):
    """A prompt file of the colour captions, our images (<id>.png) and reference images."""
    records = [PromptRecord(i, f"img{i:02d}", caption_of(c)) for i, c in enumerate(COLOURS)]
    prompts = write_prompt_file(tmp_path / "prompts.jsonl", records)
    (tmp_path / "images").mkdir()
    (tmp_path / "references").mkdir()
    for i, colour in enumerate(COLOURS):
        colour_image(colour, size=48, seed=i).save(tmp_path / "images" / f"img{i:02d}.png")
        colour_image(colour, size=64, seed=100 + i).save(tmp_path / "references" / f"ref{i:02d}.png")
    return {
        "prompts": prompts,
        "images": tmp_path / "images",
        "references": tmp_path / "references",
        "out": tmp_path / "out",
    }


@pytest.fixture
def metric_overrides(inception_weights, tiny_transformers_clip, tiny_open_clip_dir):
    """The tiny metric models; Inception at its 64-d pool features for CPU speed."""
    return [
        f"metrics.fid.weights={inception_weights}",
        "metrics.fid.feature=64",
        "metrics.inception_score.feature=64",
        "metrics.inception_score.splits=2",
        "metrics.clip_score.backend=open_clip",
        f"metrics.clip_score.model={tiny_open_clip_dir}",
        f"metrics.pickscore.model={tiny_transformers_clip['model']}",
        f"metrics.pickscore.processor={tiny_transformers_clip['processor']}",
        "resolution=32",
        "batch_size=4",
        "progress=false",
        "grid.tile=16",
    ]


def eval_config(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF / "eval"), version_base="1.3"):
        return compose("eval", overrides=overrides)


def test_scores_an_image_folder_and_writes_the_report(colour_set, metric_overrides):
    cfg = eval_config(metric_overrides + [f"{k}={v}" for k, v in colour_set.items()])
    metrics = evaluate(cfg)
    assert set(metrics) >= {"fid", "inception_score", "clip_score", "pickscore"}
    assert metrics["fid_references"] == len(COLOURS)
    out = colour_set["out"]
    written = json.loads((out / "metrics.json").read_text())
    assert written["metrics"]["pickscore"] == pytest.approx(metrics["pickscore"])
    assert written["settings"]["num_images"] == len(COLOURS)
    table = (out / "results.md").read_text()
    assert "| ours | this run | 6 |" in table and "| Würstchen v2 | paper | 30,000 | 23.60 | 40.90 |" in table
    assert "Sampler: not recorded (the images were given" in table
    assert (out / "samples.png").is_file()


def test_pickscore_compare_reports_the_preference_for_our_images(colour_set, metric_overrides, tmp_path):
    # The other "model" drew every caption with the wrong colour.
    other = tmp_path / "other"
    other.mkdir()
    colours = list(COLOURS)
    for i in range(len(colours)):
        colour_image(colours[(i + 1) % len(colours)], seed=i).save(other / f"img{i:02d}.png")
    overrides = metric_overrides + [f"{k}={v}" for k, v in colour_set.items()]
    overrides += [
        "metrics.fid.enabled=false",
        "metrics.inception_score.enabled=false",
        "metrics.clip_score.enabled=false",
        f"+metrics.pickscore.compare.wrong_colours={other}",
    ]
    metrics = evaluate(eval_config(overrides))
    assert metrics["pickscore_preference"]["wrong_colours"] > 0.5
    assert "over wrong_colours" in (colour_set["out"] / "results.md").read_text()


def test_fid_without_references_says_what_to_pass(colour_set, metric_overrides):
    overrides = metric_overrides + [f"{k}={v}" for k, v in colour_set.items() if k != "references"]
    with pytest.raises(ValueError, match="FID needs reference images: pass references="):
        evaluate(eval_config(overrides))


def test_missing_images_are_counted_and_named(colour_set, metric_overrides):
    (colour_set["images"] / "img03.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"lacks 1 of 6 prompt images \(img03\)"):
        evaluate(eval_config(metric_overrides + [f"{k}={v}" for k, v in colour_set.items()]))


def test_generates_from_a_pipeline_directory_then_scores(tiny_pipeline_dir, metric_overrides, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(caption_of(c) for c in COLOURS) + "\n")
    out = tmp_path / "out"
    overrides = metric_overrides + [
        f"prompts={prompts}",
        "limit=4",
        f"out={out}",
        f"pipeline={tiny_pipeline_dir}",
        "generation.sampler.sampler=tiny",
        "generation.height=128",
        "generation.width=128",
        "generation.batch_size=2",
        "metrics.fid.enabled=false",
    ]
    metrics = evaluate(eval_config(overrides))
    assert sorted(p.name for p in (out / "images").glob("*.png")) == [f"{i:06d}.png" for i in range(4)]
    assert {"inception_score", "clip_score", "pickscore"} <= set(metrics)
    settings = json.loads((out / "metrics.json").read_text())["settings"]
    assert settings["config"]["pipeline"] == str(tiny_pipeline_dir)
    # results.md states how the images were drawn (conf/sampler/tiny.yaml: 8 + 6 linear steps at w = 2)
    assert settings["sampler"].startswith("tiny (ddpm; Stage C linear grid, 8 steps at w = 2;")
    assert f"- Sampler: {settings['sampler']}." in (out / "results.md").read_text()


def test_the_default_sampler_is_the_released_call():
    assert eval_config([]).generation.sampler.sampler == "paper"  # conf/sampler/paper.yaml


@pytest.mark.slow
def test_wurst_eval_command_line_scores_a_folder(colour_set, metric_overrides):
    overrides = metric_overrides + [f"{k}={v}" for k, v in colour_set.items()]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "wurst.eval", *overrides],
        check=False,
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((colour_set["out"] / "metrics.json").read_text())["metrics"]["fid"] >= 0


@pytest.mark.slow
def test_torchrun_shards_generation_across_two_ranks(tiny_pipeline_dir, metric_overrides, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(caption_of(c) for c in COLOURS) + "\n")
    out = tmp_path / "out"
    overrides = metric_overrides + [
        f"prompts={prompts}",
        f"out={out}",
        f"pipeline={tiny_pipeline_dir}",
        "generation.sampler.sampler=tiny",
        "generation.height=128",
        "generation.width=128",
        "generation.batch_size=2",
        "metrics.fid.enabled=false",
        "metrics.clip_score.enabled=false",
        "metrics.inception_score.enabled=false",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        "29517",
        "-m",
        "eval",
        *overrides,
    ]
    result = subprocess.run(
        command, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=500
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(list((out / "images").glob("*.png"))) == len(read_prompt_file(prompts))
    logs = result.stdout + result.stderr
    assert "rank 0/2: wrote 3 images" in logs and "rank 1/2: wrote 3 images" in logs
    assert json.loads((out / "metrics.json").read_text())["metrics"]["pickscore"] is not None


def test_decoded_batches_keep_the_order_of_the_paths(tmp_path):
    from wurst.eval.evaluate import decoded_batches

    paths = []
    for i in range(11):
        colour_image(list(COLOURS)[i % len(COLOURS)], size=8 + i, seed=i).save(tmp_path / f"{i}.png")
        paths.append(tmp_path / f"{i}.png")
    batches = list(decoded_batches(paths, batch_size=3, workers=2, progress=False))
    assert [len(b) for b in batches] == [3, 3, 3, 2]
    assert [image.size[0] for b in batches for image in b] == [8 + i for i in range(11)]
