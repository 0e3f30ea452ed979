"""Networks from plain config dicts (``_target_`` + constructor kwargs), and the config an export records.

Stage modules build their networks in ``__init__`` from such dicts, so checkpoints hold only tensors and
plain containers and load with ``weights_only=True``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import hydra.utils
from torch import nn


def instantiate_network(config: Mapping[str, Any]) -> nn.Module:
    """Builds a network from a plain ``{_target_: ..., **kwargs}`` dict."""
    return hydra.utils.instantiate(dict(config), _convert_="all")


def network_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The constructor config written to ``config.json`` (everything but Hydra's private keys)."""
    return {k: v for k, v in dict(config).items() if not (k.startswith("_") and k != "_target_")}
