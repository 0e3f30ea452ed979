"""What FSDP shards as one unit (conf/trainer/fsdp.yaml's auto-wrap policy).

Each block of the networks is a unit: one all-gather of a block's parameters at a time, so a GPU holds
the full weights of one block plus its shard of the rest — without a policy FSDP would gather the whole
network at once and save no memory. Frozen or separately trained parts are units of their own (the text
encoders, Stage A inside Stage B, the compressor, the EMA copy), so that no unit mixes trained and frozen
parameters and FSDP runs with ``use_orig_params: false``, whose full-state-dict checkpoints resume
exactly (with ``true``, torch's resumed optimiser stepped differently: 2e-3 apart after two steps in the
CPU test).

Lightning's FSDPStrategy refuses the CPU ("The strategy `fsdp` requires a GPU accelerator"), so
tests/distributed/test_fsdp_cpu.py runs this plan with torch's own FSDP on CPU (gloo): training equal to
DDP, the full-state-dict checkpoint round trip, and the real Stage C module wrapped without a mixed unit.
"""

from __future__ import annotations

from torch import nn

from wurst.models.common import AttnBlock, ResBlock, TimestepBlock
from wurst.models.semantic_compressor import SemanticCompressor
from wurst.models.stage_a import StageA
from wurst.models.stage_b import ResBlockStageB
from wurst.models.text_encoder import TextEncoder
from wurst.train.ema import EMA


def block_classes() -> set[type[nn.Module]]:
    """The block classes of Stage B and Stage C (ResBlock / ResBlockStageB, TimestepBlock, AttnBlock)."""
    return {ResBlock, ResBlockStageB, TimestepBlock, AttnBlock}


def wrap_classes() -> set[type[nn.Module]]:
    """What conf/trainer/fsdp.yaml wraps: the blocks, and each frozen or separately trained part whole."""
    return block_classes() | {TextEncoder, StageA, SemanticCompressor, EMA}
