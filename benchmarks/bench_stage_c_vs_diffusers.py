"""Time forward + backward of our StageC against diffusers' WuerstchenPrior on the same weights.

Both networks hold identical weights (ours → ``to_diffusers``), see identical inputs and run in train
mode. diffusers' prior pins its default attention processor (plain matmul-softmax-matmul); ours calls
``scaled_dot_product_attention``. Runs alternate between the two so that load on a shared machine hits
both alike; the median of the repeats is reported, as wall time and as this process's CPU time. On a
shared CPU the CPU time is the steadier figure, and one thread (the default on CPU) avoids measuring
thread-pool stalls caused by other processes.

    .venv/bin/python benchmarks/bench_stage_c_vs_diffusers.py [--c 256 --depth 4 --device cpu ...]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from wurst.models.diffusers_compat import to_diffusers
from wurst.models.stage_c import StageC


def _step(model: torch.nn.Module, x: torch.Tensor, r: torch.Tensor, c: torch.Tensor) -> tuple[float, float]:
    """One forward + backward; (wall seconds, process CPU seconds)."""
    if x.is_cuda:
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    model(x, r, c).square().mean().backward()
    if x.is_cuda:
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    model.zero_grad(set_to_none=True)
    return wall, cpu


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--c", type=int, default=256, help="block width")
    parser.add_argument("--depth", type=int, default=4, help="(ResBlock, TimestepBlock, AttnBlock) triples")
    parser.add_argument("--nhead", type=int, default=4)
    parser.add_argument("--c-cond", type=int, default=256, help="text state width")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--side", type=int, default=12, help="latent side (12 = paper phase 1)")
    parser.add_argument("--tokens", type=int, default=77, help="text tokens")
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = torch's default)")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    device = torch.device(args.device)
    cfg = {
        "c_in": 16,
        "c": args.c,
        "c_cond": args.c_cond,
        "c_r": 64,
        "depth": args.depth,
        "nhead": args.nhead,
    }
    ours = StageC(**cfg, dropout=args.dropout).to(device).train()
    theirs = to_diffusers(ours)
    x = torch.randn(args.batch, 16, args.side, args.side, device=device)
    r = torch.rand(args.batch, device=device)
    c = torch.randn(args.batch, args.tokens, args.c_cond, device=device)

    for _ in range(args.warmup):
        _step(ours, x, r, c)
        _step(theirs, x, r, c)
    times: dict[str, list[tuple[float, float]]] = {"ours": [], "diffusers": []}
    for _ in range(args.repeats):
        times["ours"].append(_step(ours, x, r, c))
        times["diffusers"].append(_step(theirs, x, r, c))

    result = {}
    for name, runs in times.items():
        result[f"{name}_wall_s"] = statistics.median(wall for wall, _ in runs)
        result[f"{name}_cpu_s"] = statistics.median(cpu for _, cpu in runs)
    result["ratio_wall"] = result["ours_wall_s"] / result["diffusers_wall_s"]
    result["ratio_cpu"] = result["ours_cpu_s"] / result["diffusers_cpu_s"]
    n_params = sum(p.numel() for p in ours.parameters())
    print(
        f"StageC {cfg} ({n_params / 1e6:.2f} M params), batch {args.batch}, latent {args.side}×{args.side}, "
        f"{args.tokens} text tokens, dropout {args.dropout}, {device}"
        + (f" ({torch.get_num_threads()} threads)" if device.type == "cpu" else "")
    )
    print(f"forward+backward, median of {args.repeats} (after {args.warmup} warm-up)   wall ms    CPU ms")
    print(
        f"  ours (SDPA)                  {result['ours_wall_s'] * 1e3:9.1f} {result['ours_cpu_s'] * 1e3:9.1f}"
    )
    print(
        f"  diffusers WuerstchenPrior    {result['diffusers_wall_s'] * 1e3:9.1f} "
        f"{result['diffusers_cpu_s'] * 1e3:9.1f}"
    )
    print(f"  ratio ours / diffusers       {result['ratio_wall']:9.3f} {result['ratio_cpu']:9.3f}")
    return result


if __name__ == "__main__":
    main()
