"""Memory of fine-tuning Stage C at paper size: full vs LoRA, batch 1-8, 24×24 latents (1024-px images).

Everything is counted on the meta device (shapes only: no memory, any machine, a few seconds):
trainable parameters (peft's LoRA layers injected into the real StageC on meta, conf/lora/stage_c.yaml),
and the activations autograd saves for backward, summed over one forward of the bf16 network at each
batch size (``saved_tensors_hooks``; a tensor saved by two ops is counted once). The predicted peak:

    weights (fp32, Lightning's bf16-mixed keeps fp32 masters) + gradients (fp32, trainable only)
    + AdamW moments (2 × fp32, or 2 × 1 byte with bitsandbytes' AdamW8bit) + EMA copy (full fine-tune
    default: on) + the frozen CLIP-bigG text tower and compressor (fp32) + saved activations (bf16)

It leaves out allocator fragmentation, CUDA context (~0.5 GB) and the workspace of kernels, so read it
as a floor with ±10%; `benchmarks/bench_train_step.py --device cuda` measures the real peak on a GPU.

    python benchmarks/bench_finetune_memory.py              # the README table
    python benchmarks/bench_finetune_memory.py --batches 1 2 --latent 12
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from omegaconf import OmegaConf

CONF = Path(__file__).resolve().parents[1] / "conf"
GB = 1024**3
TEXT_TOKENS, TEXT_WIDTH = 77, 1280
# CLIP-bigG's text tower (open_clip ViT-bigG-14): width 1280, 32 layers, 20 heads, vocab 49,408, context 77.
CLIP_BIGG_TEXT = {"context_length": 77, "vocab_size": 49408, "width": 1280, "heads": 20, "layers": 32, "output_dim": 1280}
COMPRESSOR_PARAMS = 20_198_000  # README: the paper compressor, measured


def stage_c_on_meta(lora: dict | None, checkpointing: bool) -> torch.nn.Module:
    from wurst.models.stage_c import StageC
    from wurst.train.lora import add_adapters

    config = {k: v for k, v in OmegaConf.to_container(OmegaConf.load(CONF / "model/stage_c/paper.yaml")).items()
              if not k.startswith("_")}
    with torch.device("meta"):
        network = StageC(**{**config, "gradient_checkpointing": checkpointing})
        if lora:
            add_adapters(network, lora)
    return network


def text_params() -> int:
    from open_clip.transformer import TextTransformer

    with torch.device("meta"):
        tower = TextTransformer(**CLIP_BIGG_TEXT)
    return sum(p.numel() for p in tower.parameters())


def saved_activation_bytes(network: torch.nn.Module, batch: int, side: int) -> int:
    network = network.to(torch.bfloat16).train()
    seen: dict[int, int] = {}
    keep = []

    def pack(tensor):
        if tensor.device.type == "meta" and id(tensor) not in seen:
            seen[id(tensor)] = tensor.numel() * tensor.element_size()
            keep.append(tensor)
        return tensor

    x = torch.empty(batch, 16, side, side, device="meta", dtype=torch.bfloat16)
    r = torch.empty(batch, device="meta", dtype=torch.bfloat16)
    c = torch.empty(batch, TEXT_TOKENS, TEXT_WIDTH, device="meta", dtype=torch.bfloat16)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        network(x, r, c).float().pow(2).mean()
    return sum(seen.values())


def table(batches: list[int], side: int, lora: dict) -> list[dict]:
    frozen = 4 * (text_params() + COMPRESSOR_PARAMS)
    rows = []
    for mode in ("full", "lora", "lora + 8-bit AdamW"):
        for checkpointing in (False, True):
            network = stage_c_on_meta(None if mode == "full" else lora, checkpointing)
            total = sum(p.numel() for p in network.parameters())
            trainable = sum(p.numel() for p in network.parameters() if p.requires_grad)
            moments = (2 if "8-bit" in mode else 8) * trainable
            ema = 4 * total if mode == "full" else 0
            static = 4 * total + 4 * trainable + moments + ema + frozen
            for batch in batches:
                activations = saved_activation_bytes(network, batch, side)
                rows.append({"mode": mode, "checkpointing": checkpointing, "batch": batch, "trainable": trainable,
                             "optimiser_gb": moments / GB, "static_gb": static / GB,
                             "activations_gb": activations / GB, "peak_gb": (static + activations) / GB})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--latent", type=int, default=24, help="Stage C latent side (24: 1024-px images)")
    parser.add_argument("--budget-gb", type=float, default=24.0)
    args = parser.parse_args()
    lora = OmegaConf.to_container(OmegaConf.load(CONF / "lora/stage_c.yaml"))
    rows = table(args.batches, args.latent, lora)
    print(f"Stage C fine-tuning at paper size, {args.latent}×{args.latent} latents, bf16-mixed "
          f"(LoRA: rank {lora['rank']} on {', '.join(lora['target_modules'])})")
    print("| mode | grad. ckpt | batch | trainable params | optimiser state GB | weights+grads+opt+EMA+frozen GB "
          f"| saved activations GB | predicted peak GB | fits {args.budget_gb:.0f} GB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        fits = "yes" if row["peak_gb"] <= args.budget_gb else "no"
        print(f"| {row['mode']} | {'on' if row['checkpointing'] else 'off'} | {row['batch']} | "
              f"{row['trainable'] / 1e6:,.1f} M | {row['optimiser_gb']:.2f} | {row['static_gb']:.1f} | "
              f"{row['activations_gb']:.1f} | {row['peak_gb']:.1f} | {fits} |")


if __name__ == "__main__":
    main()
