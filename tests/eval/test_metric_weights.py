"""Every metric's weights are found before the first image is generated, and a metric that has none
names the setting and the environment variable that give it some."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from wurst.eval.evaluate import evaluate

from .conftest import COLOURS, CONF, caption_of
from .test_wurst_eval import eval_config

REPO = CONF.parent
METRIC_SETTINGS = {  # config key → environment variable, for every weight of the default metrics
    "metrics.fid.weights": "WURST_INCEPTION_WEIGHTS",
    "metrics.clip_score.model": "WURST_CLIP_SCORE_MODEL",
    "metrics.pickscore.model": "WURST_PICKSCORE_MODEL",
    "metrics.pickscore.processor": "WURST_PICKSCORE_PROCESSOR",
}


@pytest.fixture
def generation(tiny_pipeline_dir, tmp_path) -> list[str]:
    """Overrides that generate 2 tiny images from the tiny pipeline into tmp_path/out/images."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(caption_of(c) for c in COLOURS) + "\n")
    return [
        f"prompts={prompts}",
        "limit=2",
        f"out={tmp_path / 'out'}",
        f"pipeline={tiny_pipeline_dir}",
        "generation.sampler.sampler=tiny",
        "generation.height=128",
        "generation.width=128",
        "generation.batch_size=2",
        "progress=false",
    ]


def generated(tmp_path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "out").rglob("*.png"))


@pytest.mark.slow
def test_offline_wurst_eval_names_every_missing_weight_before_generating_anything(generation, tmp_path):
    """A compute node: no network, empty caches. The documented command fails at once, not after
    generating every image, and says which key or environment variable each metric needs."""
    caches = tmp_path / "empty-caches"
    env = {k: v for k, v in os.environ.items() if k not in METRIC_SETTINGS.values()}
    env.update(
        {
            "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1",
            "TORCH_HOME": str(caches / "torch"),
            "XDG_CACHE_HOME": str(caches / "xdg"),
            "HF_HOME": str(caches / "hf"),
        }
    )
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "wurst.eval", *generation, "metrics.fid.enabled=false"],
        check=False,
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    elapsed = time.monotonic() - started
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    assert generated(tmp_path) == [], (
        f"images were generated before the metric weights were checked:\n{output[-3000:]}"
    )
    assert "MetricWeightsError" in output and "nothing has been generated" in output, output[-3000:]
    for key, env_var in METRIC_SETTINGS.items():
        assert key in output and env_var in output, f"{key} / {env_var} not named:\n{output[-3000:]}"
    assert "URLError" not in output
    print(f"offline wurst-eval stopped after {elapsed:.1f} s (process start included), 0 images generated")


def test_a_missing_pickscore_folder_stops_evaluation_before_generation(
    generation, tmp_path, inception_weights, tiny_transformers_clip
):
    overrides = generation + [
        "metrics.fid.enabled=false",
        f"metrics.inception_score.weights={inception_weights}",
        f"metrics.clip_score.model={tiny_transformers_clip['model']}",
        f"metrics.pickscore.model={tmp_path / 'no-such-pickscore'}",
        f"metrics.pickscore.processor={tiny_transformers_clip['processor']}",
    ]
    with pytest.raises(FileNotFoundError) as error:  # a MetricWeightsError
        evaluate(eval_config(overrides))
    message = str(error.value)
    assert f"{tmp_path / 'no-such-pickscore'} does not exist" in message
    assert "metrics.pickscore.model" in message and "WURST_PICKSCORE_MODEL" in message
    assert generated(tmp_path) == []


def test_inception_weights_in_torch_hubs_cache_are_used_without_a_download(
    monkeypatch, tmp_path, inception_weights
):
    from wurst.eval import metric_weights

    cached = tmp_path / "torch" / "hub" / "checkpoints" / inception_weights.name
    cached.parent.mkdir(parents=True)
    cached.write_bytes(inception_weights.read_bytes())
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(metric_weights, "INCEPTION_URL", "http://127.0.0.1:9/never-fetched.pth")
    cfg = eval_config(
        [
            "prompts=unused.txt",
            "metrics.fid.weights=null",
            "metrics.clip_score.enabled=false",
            "metrics.pickscore.enabled=false",
        ]
    )
    resolved = metric_weights.resolve_metric_weights(cfg)
    assert resolved == {"metrics.fid.weights": str(cached), "metrics.inception_score.weights": str(cached)}
    assert cfg.metrics.inception_score.weights == str(cached)


def test_a_failed_inception_download_names_the_key_and_the_variable(monkeypatch, tmp_path):
    from wurst.eval import metric_weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    # Port 9 (discard) on localhost refuses the connection: a real failed download, without the network.
    monkeypatch.setattr(
        metric_weights, "INCEPTION_URL", "http://127.0.0.1:9/weights-inception-2015-12-05-6726825d.pth"
    )
    cfg = eval_config(
        [
            "prompts=unused.txt",
            "references=.",
            "metrics.fid.weights=null",
            "metrics.clip_score.enabled=false",
            "metrics.pickscore.enabled=false",
        ]
    )
    with pytest.raises(metric_weights.MetricWeightsError) as error:
        metric_weights.resolve_metric_weights(cfg)
    message = str(error.value)
    assert "Inception (FID, IS): the download failed" in message
    assert "metrics.fid.weights=" in message and "WURST_INCEPTION_WEIGHTS" in message
    assert message.count("Inception") == 1  # IS shares FID's weights: one problem, listed once
    assert not list((tmp_path / "torch").rglob("*.pth"))  # no partial file left in the cache
