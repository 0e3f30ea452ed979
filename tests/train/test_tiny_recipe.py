"""The tiny recipe's prompt check (train/prompt_fidelity.py), its held-out data and the report figures."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from wurst.data.synthetic import COLORS, SHAPES, combinations, held_out_combinations, write_synthetic_shards
from wurst.train.prompt_fidelity import (
    CHANCE,
    classify_shape,
    ground_truth_images,
    held_out_prompts,
    limiting_stage,
    read_image,
    score,
)
from wurst.train.report_figures import read_loss_curves, write_report_figure


def test_the_reader_reads_every_held_out_ground_truth_picture_right():
    # The writer's own pictures (random centre and radius, JPEG round trip): the check's accuracy is known.
    combos = held_out_prompts(0.1)
    for radius_range in ((0.2, 0.35), (0.25, 0.4)):
        images = ground_truth_images(combos, 128, seed=3, radius_range=radius_range)
        result = score([read_image(x) for x in images], combos)
        assert (result["background"], result["foreground"], result["shape"], result["all_three"]) == (1, 1, 1, 1)


def test_the_reader_reads_soft_edged_pictures_as_drawn():
    # Decoded images have soft edges and halos: a Gaussian blur of sigma 3 px still reads right.
    from torchvision.transforms.functional import gaussian_blur

    combos = held_out_prompts(0.1)
    blurred = gaussian_blur(ground_truth_images(combos, 128, seed=5, radius_range=(0.25, 0.4)), [13, 13], [3.0, 3.0])
    result = score([read_image(x) for x in blurred], combos)
    assert result["shape"] == 1 and result["all_three"] >= 0.98


def test_a_diamond_stands_on_a_corner_and_is_not_read_as_a_square():
    combos = [("red", "diamond", "blue"), ("red", "square", "blue")]
    diamond, square = ground_truth_images(combos, 128, radius_range=(0.3, 0.3))
    assert read_image(diamond)["shape"] == "diamond" and read_image(square)["shape"] == "square"
    mask = (diamond[0] > 0.5).numpy()  # red foreground
    top_row = np.nonzero(mask.any(axis=1))[0][0]
    assert mask[top_row].sum() <= 3  # a corner on top, not a flat side


def test_a_flat_image_has_no_foreground_and_no_shape():
    flat = torch.tensor(COLORS["green"], dtype=torch.float32).view(3, 1, 1).expand(3, 128, 128) / 255
    assert read_image(flat) == {"background": "green", "foreground": None, "shape": None}


def test_shape_classifier_returns_its_overlap():
    mask = np.zeros((64, 64), dtype=bool)
    mask[16:48, 16:48] = True
    assert classify_shape(mask) == ("square", 1.0)


def test_held_out_combinations_are_never_written_but_their_parts_are(tmp_path):
    held = held_out_combinations(0.1)
    assert len(held) == round(0.1 * len(combinations())) == 106
    write_synthetic_shards(tmp_path, num_samples=600, num_shards=2, resolution=32, seed=0, hold_out=0.1)
    captions = []
    for shard in sorted(tmp_path.glob("*.tar")):
        with tarfile.open(shard) as tar:
            captions += [tar.extractfile(m).read().decode() for m in tar if m.name.endswith(".txt")]
    pattern = re.compile(r"an? (\w+) (\w+) on a (\w+) background")
    written = {pattern.fullmatch(c).groups() for c in captions}
    assert written and not written & held
    trained = set(combinations()) - held
    for fg, shape, bg in held:  # every pair inside a held-out triple occurs in a trained one
        assert any(t[0] == fg and t[1] == shape for t in trained)
        assert any(t[1] == shape and t[2] == bg for t in trained)
        assert any(t[0] == fg and t[2] == bg for t in trained)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["hold_out"] == 0.1 and len(manifest["held_out"]) == 106


def test_no_hold_out_keeps_the_writers_bytes(tmp_path):
    write_synthetic_shards(tmp_path / "a", num_samples=12, num_shards=1, resolution=16, seed=1)
    write_synthetic_shards(tmp_path / "b", num_samples=12, num_shards=1, resolution=16, seed=1, hold_out=0.0)
    assert (tmp_path / "a/00000.tar").read_bytes() == (tmp_path / "b/00000.tar").read_bytes()


def test_score_counts_all_three_and_carries_chance():
    truths = [("red", "circle", "blue"), ("red", "circle", "blue")]
    readings = [{"foreground": "red", "shape": "circle", "background": "blue"},
                {"foreground": "red", "shape": "star", "background": "blue"}]
    result = score(readings, truths)
    assert (result["background"], result["foreground"], result["shape"], result["all_three"]) == (1, 1, 0.5, 0.5)
    assert result["chance"] == CHANCE
    assert CHANCE["background"] == 1 / 12 and CHANCE["foreground"] == 1 / 11 and CHANCE["shape"] == 1 / len(SHAPES)


def test_the_limiting_stage_is_the_biggest_drop():
    result = {"reader": {"all_three": 1.0}, "stage_a": {"all_three": 0.95}, "stage_b": {"all_three": 0.4},
              "cascade": {"all_three": 0.3}}
    assert limiting_stage(result).startswith("Stage B")


def test_report_figure_plots_csv_loss_curves_beside_labelled_samples(tmp_path):
    logs = tmp_path / "stage_b" / "logs"
    logs.mkdir(parents=True)
    (logs / "metrics.csv").write_text("epoch,step,train/loss,train/lr\n0,9,1.0,0.1\n0,19,0.5,0.1\n,29,,0.1\n")
    assert read_loss_curves(tmp_path / "stage_b") == {"train/loss": [(9, 1.0), (19, 0.5)]}
    images = torch.rand(4, 3, 32, 32)
    path = write_report_figure(tmp_path / "report.png", tmp_path, images, ["a red circle", "a blue star"], 2)
    width, height = Image.open(path).size
    assert width > height > 0
    curves_only = write_report_figure(tmp_path / "curves.png", tmp_path, None, [], 0)
    assert Image.open(curves_only).size[0] > 0
    assert write_report_figure(tmp_path / "none.png", tmp_path / "empty", None, [], 0) is None


@pytest.mark.slow
def test_the_tiny_pipeline_smoke_run_writes_the_prompt_check_per_stage(tmp_path):
    # The recipe's code path for 2 steps a stage: every figure of the check, with chance beside it.
    argv = [sys.executable, "-m", "wurst.train", "pipeline=tiny", "logger=csv", "callbacks.progress_bar=false",
            f"paths.output_dir={tmp_path / 'out'}", f"paths.data_dir={tmp_path / 'data'}",
            "data.synthesize.num_samples=64", "data.synthesize.num_shards=4", "data.global_batch_size=4",
            "data.num_workers=0", "trainer.max_steps=2", "trainer.log_every_n_steps=1",
            "pipeline.report.prompt_count=4"]
    result = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    pipeline = tmp_path / "out" / "tiny"
    check = json.loads((pipeline / "prompt_fidelity.json").read_text())
    assert check["reader"]["all_three"] == 1.0 and check["hold_out"] == 0.1
    assert check["stage_a"]["psnr_db"] > 0
    for stage in ("stage_a", "stage_b", "cascade"):
        assert check[stage]["images"] == 4 and check[stage]["chance"] == CHANCE
    assert "limited by" in result.stdout and "Stage B ceiling" in result.stdout
    assert (pipeline / "report.png").is_file() and (pipeline / "loss_curves.png").is_file()
