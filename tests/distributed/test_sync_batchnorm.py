"""SyncBatchNorm for multi-process training (issue 14): the BatchNorms of a network a stage trains
(Stage B's jointly trained compressor, Stage A's latent norm) use the global batch's statistics under
DDP, so every rank ends with the same running statistics; the export holds plain BatchNorm2d and loads
in one process. ``stage.module.sync_batchnorm`` turns it on: in the paper's Stage B phases, as the
official script does, and in the tiny recipe."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from wurst.train.export import load_network
from wurst.train.sync_batchnorm import (
    SYNCED,
    CPUSyncBatchNorm,
    convert_to_sync_batchnorm,
    revert_sync_batchnorm,
)

from .conftest import REPO, STEPS, TORCHRUN, WORLD, compose, finish, launch, max_abs_difference, with_prefix


@pytest.mark.parametrize("experiment", ["paper_v2/stage_b_512", "paper_v2/stage_b_1024"])
def test_the_paper_stage_b_phases_sync_the_compressor_batchnorm(experiment):
    assert compose([f"experiment={experiment}"]).stage.module.sync_batchnorm is True


@pytest.mark.parametrize("stage", ["a", "b"])
def test_the_tiny_recipe_syncs_batchnorm_too(stage):
    assert compose([f"stage={stage}", "experiment=tiny"]).stage.module.sync_batchnorm is True


@pytest.mark.slow
def test_two_synced_ranks_train_as_one_process_on_the_whole_batch(tmp_path):
    result_file, log = tmp_path / "result.json", tmp_path / "equivalence.log"
    argv = [
        str(TORCHRUN),
        "--standalone",
        f"--nproc_per_node={WORLD}",
        str(REPO / "tests" / "distributed" / "payloads" / "sync_batchnorm_equivalence.py"),
        str(result_file),
    ]
    finish(launch(argv, log), log, timeout_s=240)
    result = json.loads(result_file.read_text())
    print(
        f"\nsynced 2 ranks vs one process: outputs {result['output']:.2e}, "
        f"state {max(result['state'].values()):.2e}"
    )
    assert (result["trained_as"], result["reverted_to"]) == ("CPUSyncBatchNorm", "BatchNorm2d")
    assert result["output"] < 1e-5
    assert max(result["state"].values()) < 1e-5, result["state"]


@pytest.mark.slow
def test_stage_b_ranks_end_with_the_same_compressor_batchnorm_statistics(ddp_stage_b):
    records = [ddp_stage_b.ranks.record(rank) for rank in range(WORLD)]
    assert all("CPUSyncBatchNorm" in r["batchnorm_classes"] for r in records)
    compressor = [with_prefix(ddp_stage_b.ranks.state(rank), "compressor.") for rank in range(WORLD)]
    stats = {
        k: v for k, v in compressor[0].items() if k.rsplit(".", 1)[-1].startswith(("running_", "num_batches"))
    }
    assert stats and all(int(v) == STEPS["b"] for k, v in stats.items() if k.endswith("num_batches_tracked"))
    moved = [
        k for k, v in stats.items() if k.endswith("running_var") and not torch.equal(v, torch.ones_like(v))
    ]
    assert moved, "the running statistics never changed"
    worst, different = max_abs_difference(stats, {k: compressor[1][k] for k in stats})
    print(f"\n{len(stats)} compressor BatchNorm statistics tensors, max |rank0 - rank1| = {worst}")
    assert different == []


@pytest.mark.slow
def test_the_exported_compressor_is_plain_batchnorm_and_loads_in_one_process(ddp_stage_b):
    compressor = load_network(ddp_stage_b.run_dir / "export", "compressor")
    norms = [m for m in compressor.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert norms and all(isinstance(m, nn.BatchNorm2d) and not isinstance(m, SYNCED) for m in norms)
    trained = with_prefix(ddp_stage_b.ranks.state(0), "compressor.")
    assert max_abs_difference(compressor.state_dict(), trained)[1] == []
    with torch.no_grad():
        z = compressor.eval()(torch.rand(2, 3, 96, 96))
    assert z.shape[:2] == (2, 16) and torch.isfinite(z).all()


def network_with_batchnorms() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
    )


@pytest.mark.parametrize("device_type", ["cpu", "cuda"])
def test_the_twins_share_the_tensors_and_keys_and_revert_to_the_very_same_modules(device_type):
    network = network_with_batchnorms()
    plain = [network[1], network[2][1]]
    keys, tensors = list(network.state_dict()), [t.data_ptr() for t in network.state_dict().values()]
    originals = convert_to_sync_batchnorm(network, device_type)
    twins = [network[1], network[2][1]]
    expected = CPUSyncBatchNorm if device_type == "cpu" else nn.SyncBatchNorm
    assert all(type(t) is expected for t in twins)
    assert (
        list(network.state_dict()) == keys
        and [t.data_ptr() for t in network.state_dict().values()] == tensors
    )
    assert twins[0].weight is plain[0].weight
    revert_sync_batchnorm(network, originals)
    assert network[1] is plain[0] and network[2][1] is plain[1] and list(network.state_dict()) == keys


def test_a_batchnorm_with_submodules_is_refused_not_silently_changed():
    class NormAct(nn.BatchNorm2d):
        def __init__(self, channels: int):
            super().__init__(channels)
            self.act = nn.SiLU()

    with pytest.raises(TypeError, match="NormAct has submodules"):
        convert_to_sync_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 1), NormAct(4)), "cpu")
