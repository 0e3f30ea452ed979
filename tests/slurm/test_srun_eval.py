"""``wurst-eval`` as srun launches it: 2 SLURM tasks (one per loopback node), no torchrun, no MASTER_ADDR.

The tasks take their ranks from SLURM (wurst.data.topology, as the data and training do), so each writes
its own share of the images; they meet at a gloo barrier whose rendezvous comes from SLURM's environment,
and only rank 0 scores. payloads/observed_eval.py records, per task, which image ids it generated and
whether it scored and when. Before issue 17.4 both tasks were rank 0 of 1: each generated all 5 images and each
scored them."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from wurst.slurm.submit import submit

from .conftest import PYTHON, REPO

OBSERVED_EVAL = Path(__file__).resolve().parent / "payloads" / "observed_eval.py"
SLOW_TASK_S = 8
PROMPTS = [f"a photo of a {colour} square" for colour in ("red", "green", "blue", "yellow", "black")]


def _eval_conftest() -> Any:
    spec = importlib.util.spec_from_file_location("wurst_tests_eval_conftest", REPO / "tests" / "eval" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def write_tiny_pipeline(root: Path) -> Path:
    """tests/eval's tiny_pipeline_dir: random-init tiny Stage A/B/C exports with their text encoders."""
    from wurst.train.export import write_network, write_provenance

    eval_conftest = _eval_conftest()
    networks, conf = eval_conftest.build_tiny_networks(), eval_conftest.CONF
    for stage in ("a", "b", "c"):
        export = root / f"stage_{stage}" / "export"
        config = OmegaConf.to_container(OmegaConf.load(conf / "model" / f"stage_{stage}" / "tiny.yaml"))
        write_network(export, "model", networks[f"stage_{stage}"], config)
        if stage in ("b", "c"):
            text_config = OmegaConf.to_container(OmegaConf.load(conf / "model" / "text_encoder" / "tiny.yaml"))
            write_network(export, "text_encoder", networks[f"text_encoder_{stage}"], text_config)
        write_provenance(export, {"note": "random weights for the srun evaluation test"})
    return root


def write_random_open_clip(folder: Path) -> Path:
    """A ``local-dir:`` open_clip folder of a tiny randomly initialised CLIP: a CLIP score to compute, no
    download (its value means nothing; the test counts where it is computed)."""
    import open_clip
    from safetensors.torch import save_file

    model_cfg = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    torch.manual_seed(0)
    model = open_clip.CLIP(**model_cfg)
    folder.mkdir(parents=True)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": {}}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return folder


@pytest.fixture(scope="module")
def srun_eval(cluster, tmp_path_factory, make_job, wait_job) -> dict[str, Any]:
    """One ``srun python observed_eval.py ...`` job on 2 nodes × 1 task; returns its files once it ended."""
    root = tmp_path_factory.mktemp("srun-eval")
    pipeline = write_tiny_pipeline(root / "pipeline")
    clip = write_random_open_clip(root / "clip")
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out, records, log, script = root / "out", root / "tasks", root / "job.out", root / "job.sbatch"
    env = {
        **yaml.safe_load((REPO / "conf" / "slurm" / "loopback.yaml").read_text())["env"],
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "WURST_TEST_RECORD_DIR": str(records),
        # rank 1 comes back from generation last: rank 0 must wait for it at the barrier
        "WURST_TEST_SLOW_TASK": f"1:{SLOW_TASK_S}",
    }
    job = make_job("wurst-test-srun-eval", log, nodes=2, tasks_per_node=1, time="10", signal_seconds=None, env=env)
    argv = [
        PYTHON,
        str(OBSERVED_EVAL),
        f"prompts={prompts}",
        f"out={out}",
        f"pipeline={pipeline}",
        "generation.sampler.sampler=tiny",
        "generation.height=128",
        "generation.width=128",
        "generation.batch_size=2",
        "device=cpu",
        "metrics.fid.enabled=false",
        "metrics.inception_score.enabled=false",
        "metrics.pickscore.enabled=false",
        "metrics.clip_score.backend=open_clip",
        f"metrics.clip_score.model={clip}",
        "batch_size=4",
        "loader_workers=1",
        "progress=false",
        "grid.tile=16",
    ]
    status = wait_job(submit(job, argv, script), 480, log)
    assert status.state == "COMPLETED", log.read_text()[-4000:]
    tasks = [json.loads((records / f"task{task}.json").read_text()) for task in (0, 1)]
    print(f"\nsrun eval: {[(t['task'], t['node'], t.get('rank'), t['written'], t['scored']) for t in tasks]}")
    return {"tasks": tasks, "out": out, "log": log, "script": script}


@pytest.mark.slow
def test_srun_tasks_are_the_ranks_of_one_world(srun_eval):
    assert {"#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1"} <= set(srun_eval["script"].read_text().splitlines())
    assert [(t["task"], t["node"], t["rank"], t["world_size"]) for t in srun_eval["tasks"]] == [
        ("0", "n1", 0, 2),
        ("1", "n2", 1, 2),
    ]


@pytest.mark.slow
def test_srun_tasks_write_disjoint_images_that_cover_every_prompt(srun_eval):
    written = [set(t["written"]) for t in srun_eval["tasks"]]
    assert not written[0] & written[1]
    ids = {p.stem for p in (srun_eval["out"] / "images").glob("*.png")}
    assert written[0] | written[1] == ids and len(ids) == len(PROMPTS)
    # rank r of 2 takes the prompts whose index ≡ r (mod 2): 3 and 2 of the 5
    assert [len(w) for w in written] == [3, 2]


@pytest.mark.slow
def test_metrics_are_computed_once_after_every_rank_has_generated(srun_eval):
    tasks = srun_eval["tasks"]
    assert [t["scored"] for t in tasks] == [1, 0]
    assert tasks[0]["scoring_started_at"] >= max(t["generated_at"] for t in tasks)
    report = json.loads((srun_eval["out"] / "metrics.json").read_text())
    assert report["settings"]["num_images"] == len(PROMPTS)
    assert isinstance(report["metrics"]["clip_score"], float)
    assert srun_eval["log"].read_text().count("metrics: {") == 1
