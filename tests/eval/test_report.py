"""metrics.json, the results table beside the paper's rows, the sample grid."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf
from PIL import Image

from wurst.eval.report import results_table, write_metrics_json, write_sample_grid

from .conftest import CONF, colour_image

PAPER_ROWS = OmegaConf.to_container(OmegaConf.load(CONF / "eval" / "paper_coco30k.yaml"))["rows"]


def test_the_paper_rows_are_reference_md_numbers():
    by_model = {row["model"]: row for row in PAPER_ROWS}
    assert (by_model["Würstchen v2"]["fid"], by_model["Würstchen v2"]["inception_score"]) == (23.6, 40.9)
    assert (
        by_model["LDM (compute-matched baseline)"]["fid"],
        by_model["LDM (compute-matched baseline)"]["inception_score"],
    ) == (43.5, 20.1)
    assert (by_model["Stable Diffusion 1.4"]["fid"], by_model["Stable Diffusion 2.1"]["fid"]) == (16.2, 15.1)


def test_table_puts_our_row_above_the_paper_rows():
    table = results_table(
        "ours",
        {
            "fid": 30.123,
            "inception_score": 35.0,
            "inception_score_std": 0.5,
            "clip_score": 31.2,
            "pickscore": 21.0,
        },
        30_000,
        PAPER_ROWS,
    )
    lines = table.splitlines()
    assert lines[0].startswith("| model | source | images | FID ↓ | IS ↑ | CLIP score ↑ | PickScore ↑")
    assert lines[2] == "| ours | this run | 30,000 | 30.12 | 35.00 ± 0.50 | 31.20 | 21.00 |"
    assert lines[3] == "| Würstchen v2 | paper | 30,000 | 23.60 | 40.90 | — | — |"
    assert "| Stable Diffusion 2.1 | paper | 30,000 | 15.10 | — | — | — |" in lines
    assert "not comparable" not in table


def test_table_warns_that_small_sets_are_not_comparable_and_lists_preferences():
    table = results_table("ours", {"fid": 80.0, "pickscore_preference": {"sd14": 0.625}}, 1000, PAPER_ROWS)
    assert "FID over 1,000 images is not comparable with FID-30K" in table
    assert "PickScore preference for our images over sd14: 62.5%" in table


def test_unknown_metric_keys_in_paper_rows_are_rejected():
    with pytest.raises(ValueError, match="unknown metric keys"):
        results_table("ours", {}, 10, [{"model": "x", "fdi": 1.0}])


def test_metrics_json_writes_non_finite_numbers_as_null(tmp_path):
    path = write_metrics_json(
        tmp_path / "metrics.json", {"fid": 1.5, "inception_score_std": float("nan")}, {"n": 2}
    )
    assert json.loads(path.read_text()) == {
        "metrics": {"fid": 1.5, "inception_score_std": None},
        "settings": {"n": 2},
    }


def test_sample_grid_tiles_the_images_row_major(tmp_path):
    paths = []
    for i, colour in enumerate(["red", "green", "blue"]):
        colour_image(colour, size=40, seed=i).save(tmp_path / f"{i}.png")
        paths.append(tmp_path / f"{i}.png")
    grid_path = write_sample_grid(paths, tmp_path / "grid.png", columns=2, tile=16)
    with Image.open(grid_path) as grid:
        assert grid.size == (32, 32)
        top_right = grid.getpixel((24, 8))
        bottom_left = grid.getpixel((8, 24))
    assert top_right[1] > 150 and bottom_left[2] > 150  # green, then blue on the next row
