"""Broken upstream exports stop a stage before its first step, naming the file, what is wrong and the
command that rebuilds it; a preview that fails after training never costs the checkpoint or the export.

The exports are the project's own (``write_hand_off_exports``: ``train.export`` writing real tiny
networks); the damage is done to those files as it happens (a copy or a write cut in half, a file
deleted, a config overwritten), and the consumer is a real ``wurst-train`` process."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from wurst.models.hub import pipeline_dir
from wurst.train.export import load_network, read_provenance

from .conftest import stage_c_argv, stage_c_dir, write_hand_off_exports

STEPS = 40


def cut_in_half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def overwrite_with_stage_b_config(path: Path) -> None:
    shutil.copy(path.parent.parent.parent / "stage_b" / "export" / "config.json", path)


# (file under <out>/tiny, what is done to it, what the error must say)
DAMAGE = {
    "truncated stage B weights": ("stage_b/export/model.safetensors", cut_in_half, "is truncated"),
    "missing stage B config": ("stage_b/export/config.json", Path.unlink, "is missing"),
    "missing stage A config": ("stage_a/export/config.json", Path.unlink, "is missing"),
    "truncated compressor": ("stage_b/export/compressor.safetensors", cut_in_half, "is truncated"),
    "stage A config of another class": ("stage_a/export/config.json", overwrite_with_stage_b_config,
                                        "but this file must describe a wurst.models.stage_a.StageA"),
}


@pytest.mark.slow
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_broken_upstream_export_stops_stage_c_before_its_first_step(damage, tmp_path, launcher):
    out = write_hand_off_exports(tmp_path / "out")
    relative, spoil, problem = DAMAGE[damage]
    broken = out / "tiny" / relative
    spoil(broken)
    stage = relative[len("stage_")]

    started = time.monotonic()
    code, output = launcher.run(stage_c_argv(out, STEPS, STEPS), tmp_path / "run.log")
    elapsed = time.monotonic() - started

    assert code != 0, output[-3000:]
    command = f"`wurst-train stage={stage} experiment=tiny paths.output_dir={out}`"
    message = next((line for line in output.splitlines() if str(broken) in line and command in line), "")
    assert problem in message, output[-3000:]
    assert "incomplete metadata" not in output  # safetensors' own error, which names no file
    run_dir = stage_c_dir(out)
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "logs" / "metrics.csv").exists()
    print(f"{damage}: refused {elapsed:.1f} s after the launch (trainer.max_steps={STEPS}, 0 steps run)")


@pytest.mark.slow
def test_a_paper_run_is_told_the_paper_phase_that_rebuilds_its_input(tmp_path, launcher):
    out = tmp_path / "out"
    code, output = launcher.run(["experiment=paper_v2/stage_c_p1", f"paths.output_dir={out}", "logger=csv"],
                                tmp_path / "c.log")
    assert code != 0
    assert f"{out}/paper_v2/stage_b/export/compressor.safetensors" in output, output[-3000:]
    assert f"`wurst-train experiment=paper_v2/stage_b_1024 paths.output_dir={out}`" in output
    assert "experiment=tiny" not in output

    # stage_b_1024 reads Stage A's export first, then stage_b_512's (its init_from).
    (out / "paper_v2" / "stage_a").mkdir(parents=True)
    shutil.copytree(write_hand_off_exports(tmp_path / "tiny") / "tiny" / "stage_a" / "export",
                    out / "paper_v2" / "stage_a" / "export")
    code, output = launcher.run(["experiment=paper_v2/stage_b_1024", f"paths.output_dir={out}", "logger=csv"],
                                tmp_path / "b.log")
    assert code != 0
    assert f"{out}/paper_v2/stage_b_512/export/model.safetensors" in output, output[-3000:]
    assert f"`wurst-train experiment=paper_v2/stage_b_512 paths.output_dir={out}`" in output


@pytest.mark.slow
def test_a_preview_that_fails_after_training_keeps_the_final_checkpoint_and_the_export(tmp_path, launcher):
    """Stage A's config disappears while Stage C trains (after the start-up checks passed): the
    end-of-run preview, which decodes through Stage A, fails for real."""
    out = write_hand_off_exports(tmp_path / "out")
    steps = 2 * STEPS  # the file goes at step 2, ~2 s (78 tiny steps) before the end-of-run preview
    run = launcher.start(stage_c_argv(out, steps, 2), tmp_path / "run.log")
    first = stage_c_dir(out) / "checkpoints" / f"step-{2:09d}.ckpt"
    deadline = time.monotonic() + 300
    while not first.is_file():
        assert run.alive(), run.output()[-3000:]
        assert time.monotonic() < deadline, "no first checkpoint in 300 s"
        time.sleep(0.01)
    (out / "tiny" / "stage_a" / "export" / "config.json").unlink()
    code = run.wait(600)
    output = run.output()

    assert code != 0, "a failed preview must be reported by the exit status"
    assert "preview(s) failed" in output and "stage_a/export/config.json" in output, output[-3000:]
    run_dir = stage_c_dir(out)
    assert (run_dir / "checkpoints" / f"step-{steps:09d}.ckpt").is_file(), sorted((run_dir / "checkpoints").iterdir())
    assert read_provenance(run_dir / "export")["steps"] == steps
    assert type(load_network(run_dir / "export")).__name__ == "StageC"
    assert "are written and kept" in output


# ----- the check itself, on files the project's writer made -------------------------------------------
@pytest.fixture
def stage_b_export(tmp_path) -> Path:
    return write_hand_off_exports(tmp_path / "out") / "tiny" / "stage_b" / "export"


def test_an_intact_export_passes_and_its_shapes_come_from_the_header(stage_b_export):
    checked = pipeline_dir.check_export(stage_b_export, "b", ("model", "compressor", "text_encoder"))
    assert checked.configs["model"]["_target_"] == "wurst.models.stage_b.StageB"
    assert set(checked.shapes["compressor"]) == set(load_network(stage_b_export, "compressor").state_dict())


@pytest.mark.parametrize("keep", [4, 7, 100, -1])
def test_a_cut_safetensors_file_is_named_as_truncated(stage_b_export, keep):
    path = stage_b_export / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:keep])
    with pytest.raises(pipeline_dir.BrokenArtifactError, match="truncated") as error:
        pipeline_dir.check_safetensors(path)
    assert error.value.path == path and str(path) in str(error.value)


def test_unparsable_json_and_missing_provenance_are_named(stage_b_export):
    config = stage_b_export / "config.json"
    config.write_text(config.read_text()[:20])
    with pytest.raises(pipeline_dir.BrokenArtifactError, match="is not valid JSON") as error:
        pipeline_dir.check_export(stage_b_export, "b")
    assert error.value.path == config
    (stage_b_export / "provenance.json").unlink()
    with pytest.raises(pipeline_dir.MissingStageError):
        pipeline_dir.check_export(stage_b_export, "b", ("compressor",))
    assert json.loads((stage_b_export / "compressor_config.json").read_text())  # untouched


def test_a_failing_pipeline_report_part_does_not_stop_the_others_and_fails_loudly(tmp_path):
    """The report of a pipeline whose Stage C export is gone (and whose test exports carry no carbon
    ledger): every part is tried, the manifest still records the report, and the report ends in an
    error that lists each failure."""
    from omegaconf import OmegaConf

    from wurst.train.pipeline_report import report_pipeline
    from wurst.train.previews import PreviewError

    pipeline = write_hand_off_exports(tmp_path / "out") / "tiny"
    (pipeline / "pipeline.json").write_text(json.dumps({"pipeline": "tiny"}))
    cfg = OmegaConf.create({"pipeline": {"name": "tiny", "report": {"sampler": "tiny", "size": 128, "prompt_check": True}},
                            "samples_prompts": ["a red circle on a blue background"]})
    with pytest.raises(PreviewError, match=r"4 preview/report part\(s\) failed") as error:
        report_pipeline(cfg, {"pipeline_dir": str(pipeline), "preview_errors": {}})
    assert "stage_c/export/model.safetensors" in str(error.value)
    manifest = json.loads((pipeline / "pipeline.json").read_text())
    assert manifest["pipeline"] == "tiny"
    assert [f.split(":")[0] for f in manifest["report"]["failures"]] == [
        "sample grid", "prompt check", "carbon ledger", "accounting"]


@pytest.mark.slow
def test_a_truncated_stage_a_export_stops_stage_b_before_its_first_step(tmp_path, launcher):
    out = write_hand_off_exports(tmp_path / "out")
    weights = out / "tiny" / "stage_a" / "export" / "model.safetensors"
    cut_in_half(weights)
    argv = ["stage=b", "experiment=tiny", "logger=csv", "callbacks.progress_bar=false", "data.num_workers=0",
            "data.global_batch_size=4", f"paths.output_dir={out}", f"trainer.max_steps={STEPS}"]
    code, output = launcher.run(argv, tmp_path / "run.log")
    assert code != 0
    assert f"{weights} (Stage B trains on Stage A latents), but the file is truncated" in output, output[-3000:]
    assert f"`wurst-train stage=a experiment=tiny paths.output_dir={out}`" in output
    assert not (out / "tiny" / "stage_b" / "checkpoints").exists()


@pytest.mark.slow
def test_a_compressor_of_other_latent_channels_is_refused_before_the_first_step(tmp_path, launcher):
    out = write_hand_off_exports(tmp_path / "out")
    code, output = launcher.run(stage_c_argv(out, STEPS, STEPS, "model.stage_c.c_in=8"), tmp_path / "run.log")
    assert code != 0
    assert "compressor_config.json has c_latent=16, but stage.module.network.c_in is 8" in output, output[-3000:]
    assert not (stage_c_dir(out) / "checkpoints").exists()
