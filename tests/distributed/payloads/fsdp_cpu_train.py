"""torchrun payload: the tiny Stage C trained with torch's FSDP on CPU (gloo) under wurst's wrap plan, or
with DDP, on the same global batches; writes rank 0's full state dict.

    torchrun --nproc_per_node 2 fsdp_cpu_train.py --mode fsdp|ddp --steps N --out DIR [--resume-from FILE]

Each step: a global batch of 4 drawn from a seed of the step, rank r takes rows r::world; loss = the
p2-weighted diffusion loss; AdamW. With --resume-from, the full state dict (model + optimizer) saved at
step k is loaded into a freshly wrapped model and training goes on from step k.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.distributed as dist
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch.distributed.fsdp import FullStateDictConfig, FullyShardedDataParallel, StateDictType
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
from torch.nn.parallel import DistributedDataParallel

from wurst.models.diffusion import DiffusionSettings
from wurst.train.config import CONFIG_DIR
from wurst.train.fsdp_plan import wrap_classes

SETTINGS = DiffusionSettings()


def batch(step: int, rank: int, world: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1000 + step)
    x0, noise = torch.randn(4, 16, 3, 3, generator=g), torch.randn(4, 16, 3, 3, generator=g)
    t, text = torch.rand(4, generator=g) * 0.9 + 0.05, torch.randn(4, 77, 64, generator=g)
    return tuple(v[rank::world] for v in (x0, noise, t, text))


def wrap_stage_c_module(rank: int, world: int, out: Path) -> None:
    """The real tiny StageCModule (network, frozen text encoder, EMA copy) wrapped as the conf wraps it:
    FSDP refuses a unit that mixes frozen and trained parameters at wrap time, so this is the plan's test.
    (Lightning would run the step through the wrapped module; calling its network from outside the root
    unit would skip the root's all-gather, so no step is taken here.)"""
    from hydra import compose, initialize_config_dir

    from wurst.train.run_stage import build_module

    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=["stage=c", "experiment=tiny", "stage.module.compressor_export=null",
                                                      f"paths.output_dir={out}", "ema.start=0"])
    module = build_module(cfg)
    module.init_ema()
    wrapped = FullyShardedDataParallel(module, auto_wrap_policy=ModuleWrapPolicy(wrap_classes()),
                                       device_id=torch.device("cpu"), use_orig_params=False)
    units = sum(isinstance(m, FullyShardedDataParallel) for m in wrapped.modules())
    mixed = [name for name, p in wrapped.named_parameters()
             if p.requires_grad and name.endswith("flat_param") and "ema" in name]
    if rank == 0:
        (out / "module.txt").write_text(f"{units} {len(mixed)}\n")
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=("fsdp", "ddp", "module"), required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--save-at", type=int, default=None)
    parser.add_argument("--resume-from", type=Path, default=None)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.mode == "module":
        wrap_stage_c_module(rank, world, args.out)
        return
    torch.manual_seed(0)
    cfg = OmegaConf.load(Path(CONFIG_DIR) / "model" / "stage_c" / "tiny.yaml")
    network = instantiate({**OmegaConf.to_container(cfg), "dropout": 0.0})
    with torch.no_grad():  # the authors' init zeroes the head: give every parameter a value
        for p in network.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.02)
    if args.mode == "fsdp":
        model = FullyShardedDataParallel(network, auto_wrap_policy=ModuleWrapPolicy(wrap_classes()),
                                         device_id=torch.device("cpu"), use_orig_params=False)
        units = sum(isinstance(m, FullyShardedDataParallel) for m in model.modules())
    else:
        model, units = DistributedDataParallel(network), 0
    start, saved = 0, None
    if args.resume_from is not None:
        saved = torch.load(args.resume_from, map_location="cpu", weights_only=True)
        with FullyShardedDataParallel.state_dict_type(model, StateDictType.FULL_STATE_DICT):
            model.load_state_dict(saved["model"])
        start = saved["step"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    if saved is not None:
        with FullyShardedDataParallel.state_dict_type(model, StateDictType.FULL_STATE_DICT):
            optimizer.load_state_dict(FullyShardedDataParallel.optim_state_dict_to_load(model, optimizer, saved["optim"]))
    for step in range(start, args.steps):
        x0, noise, t, text = batch(step, rank, world)
        loss, _ = SETTINGS.loss(model(SETTINGS.add_noise(x0, t, noise), t, text), noise, t)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if args.mode == "fsdp" and args.save_at is not None and step + 1 == args.save_at:
            full = FullStateDictConfig(offload_to_cpu=True, rank0_only=True)
            with FullyShardedDataParallel.state_dict_type(model, StateDictType.FULL_STATE_DICT, full):
                state = model.state_dict()
                optim = FullyShardedDataParallel.optim_state_dict(model, optimizer)
            if rank == 0:
                torch.save({"model": state, "optim": optim, "step": step + 1}, args.out / "checkpoint.pt")
    if args.mode == "fsdp":
        full = FullStateDictConfig(offload_to_cpu=True, rank0_only=True)
        with FullyShardedDataParallel.state_dict_type(model, StateDictType.FULL_STATE_DICT, full):
            state = model.state_dict()
    else:
        state = model.module.state_dict()
    if rank == 0:
        torch.save({"state": state, "units": units}, args.out / f"final_{args.mode}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
