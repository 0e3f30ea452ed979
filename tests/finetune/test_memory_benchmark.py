"""benchmarks/bench_finetune_memory.py counts what trains at paper size on the meta device."""

from __future__ import annotations

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_finetune_memory.py"


def bench():
    spec = importlib.util.spec_from_file_location("bench_finetune_memory", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_table_counts_every_paper_parameter_for_full_and_only_the_adapters_for_lora():
    module = bench()
    lora = {"rank": 16, "alpha": 16, "target_modules": ["to_q", "to_k", "to_v", "to_out.0", "channelwise.0",
                                                        "channelwise.4"]}
    rows = {(r["mode"], r["checkpointing"]): r for r in module.table([1], 4, lora)}
    assert rows[("full", False)]["trainable"] == 993_636_896  # README: Stage C, paper config
    # r·(in + out) per adapted linear: 4 attention maps 1536→1536, MLP 1536→6144 and 6144→1536; 32 triples.
    assert rows[("lora", False)]["trainable"] == 32 * 16 * (4 * (1536 + 1536) + 2 * (1536 + 6144))
    assert rows[("lora + 8-bit AdamW", False)]["optimiser_gb"] < rows[("lora", False)]["optimiser_gb"] / 3
    assert rows[("lora", True)]["activations_gb"] < rows[("lora", False)]["activations_gb"]
    assert rows[("full", False)]["peak_gb"] > rows[("lora", False)]["peak_gb"]
