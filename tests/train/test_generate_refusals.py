"""``wurst-generate`` refuses a request it cannot serve before any model loads, and leaves no folder.

Run as the user runs it: the console script, on a pipeline directory of real (tiny, random) exports.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from wurst.train.export import write_network, write_provenance

from .conftest import tiny_network_config, write_tiny_export

WURST_GENERATE = str(Path(sys.executable).with_name("wurst-generate"))


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pipeline") / "tiny"
    write_tiny_export(root / "stage_a" / "export", "a")
    write_tiny_export(root / "stage_b" / "export", "b")
    torch.manual_seed(0)
    c_dir = root / "stage_c" / "export"
    for name, group in (("model", "stage_c"), ("text_encoder", "text_encoder")):
        cfg = tiny_network_config(group)
        write_network(c_dir, name, instantiate(cfg), cfg)
    write_provenance(c_dir, {"stage": "c", "made_by": "tests/train/test_generate_refusals.py"})
    return root


def wurst_generate(pipeline_dir: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([WURST_GENERATE, str(pipeline_dir), "--prompt", "a red circle on a blue background",
                           "--sampler", "tiny", "--device", "cpu", *args],
                          check=False, capture_output=True, text=True, timeout=300, env=env)


def assert_refused(result: subprocess.CompletedProcess, *words: str) -> None:
    assert result.returncode == 2, result.stderr[-2000:]  # argparse's usage error, no traceback
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    for word in words:
        assert word in result.stderr, result.stderr[-2000:]


def test_a_zero_batch_size_is_refused_naming_the_option(pipeline_dir, tmp_path):
    result = wurst_generate(pipeline_dir, "--batch-size", "0", "--out", str(tmp_path / "images"))
    assert_refused(result, "--batch-size 0", "positive")
    assert not (tmp_path / "images").exists()


def test_an_out_that_is_a_file_is_refused_naming_it(pipeline_dir, tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("keep me\n")
    result = wurst_generate(pipeline_dir, "--out", str(target))
    assert_refused(result, f"--out {target} is a file")
    assert target.read_text() == "keep me\n"


def test_a_size_stage_b_cannot_run_at_is_refused_and_leaves_no_folder(pipeline_dir, tmp_path):
    result = wurst_generate(pipeline_dir, "--width", "130", "--out", str(tmp_path / "images"))
    assert_refused(result, "width=130", "use width=256")
    assert not (tmp_path / "images").exists()


def test_refusals_come_before_any_model_loads(pipeline_dir, tmp_path, monkeypatch):
    import wurst.train.generate as generate_module

    def load_cascade(*args, **kwargs):
        raise AssertionError("the models were loaded before the request was checked")

    monkeypatch.setattr(generate_module, "load_cascade", load_cascade)
    for kwargs, message in (({"batch_size": -1}, "--batch-size -1"), ({"height": 0}, "height must be a positive")):
        with pytest.raises(ValueError, match=message):
            generate_module.generate(pipeline_dir, ["a prompt"], tmp_path / "images", sampler="tiny", **kwargs)
    assert not (tmp_path / "images").exists()


def test_a_valid_request_still_writes_its_images(pipeline_dir, tmp_path):
    result = wurst_generate(pipeline_dir, "--out", str(tmp_path / "images"), "--batch-size", "1")
    assert result.returncode == 0, result.stderr[-2000:]
    assert [p.suffix for p in (tmp_path / "images").iterdir()] == [".png"]
