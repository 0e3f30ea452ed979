"""Bad inputs stop a run before any network or data worker is built, with errors that name the
input and the fix."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hydra.errors import MissingConfigException

from wurst.train.export import MissingExportError
from wurst.train.pipeline import check_stage_order
from wurst.train.run_stage import train_stage

from .conftest import REPO, compose_train


def test_stage_b_without_a_stage_a_export_names_the_file_and_the_command(tmp_path):
    cfg = compose_train(["stage=b", "experiment=tiny", f"paths.output_dir={tmp_path}"])
    with pytest.raises(MissingExportError) as err:
        train_stage(cfg)
    assert f"{tmp_path}/tiny/stage_a/export/model.safetensors" in str(err.value)
    assert "wurst-train stage=a experiment=tiny" in str(err.value)
    assert not (tmp_path / "tiny" / "stage_b").exists()  # nothing was started


def test_stage_c_without_a_compressor_names_the_stage_b_export(tmp_path):
    cfg = compose_train(["stage=c", "experiment=tiny", f"paths.output_dir={tmp_path}"])
    with pytest.raises(MissingExportError, match=r"stage_b/export/compressor.safetensors.*wurst-train stage=b"):
        train_stage(cfg)


def test_indivisible_global_batch_stops_before_training(tiny_pipeline_dir):
    cfg = compose_train([
        "stage=c", "experiment=tiny", f"paths.output_dir={tiny_pipeline_dir.parent}",
        "data.global_batch_size=15", "accumulate_grad_batches=2", "logger=csv",
    ])
    with pytest.raises(ValueError, match="global_batch_size=15 is not divisible by world size 1"):
        train_stage(cfg)
    assert not list((tiny_pipeline_dir / "stage_c").glob("checkpoints/*.ckpt"))


def test_unknown_experiment_lists_the_known_ones():
    with pytest.raises(MissingConfigException, match="experiment/no_such_thing"):
        compose_train(["experiment=no_such_thing"])


def test_a_pipeline_that_trains_c_before_b_is_refused():
    with pytest.raises(ValueError, match="stage order violation: stage B comes after stage C"):
        check_stage_order([["stage=a"], ["stage=c"], ["stage=b"]])


def test_init_from_a_missing_export_is_refused(tmp_path):
    cfg = compose_train(["stage=a", "experiment=tiny", f"paths.output_dir={tmp_path}",
                         f"+init_from.path={tmp_path}/nowhere", "+init_from.mode=weights"])
    with pytest.raises(MissingExportError, match="init_from"):
        train_stage(cfg)


@pytest.mark.slow
def test_the_command_line_reports_a_missing_hand_off_and_exits_nonzero(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "wurst.train", "stage=b", "experiment=tiny", f"paths.output_dir={tmp_path}"],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode != 0
    assert "wurst-train stage=a experiment=tiny" in result.stderr + result.stdout
