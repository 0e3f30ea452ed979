"""The accounting tables: board power, carbon-intensity presets and the paper's Table 2 rows.

The numbers live once, in ``conf/accounting/tables/*.yaml``; this module only reads them.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

TABLES_DIR = Path(__file__).resolve().parents[2] / "conf" / "accounting" / "tables"


@cache
def load_table(name: str) -> dict[str, Any]:
    """Returns ``conf/accounting/tables/<name>.yaml`` as plain Python containers."""
    path = TABLES_DIR / f"{name}.yaml"
    if not path.is_file():
        raise FileNotFoundError(
            f"accounting table {name!r} not found at {path}; the repository's conf/accounting/tables/ "
            "must sit beside train/ (run from a checkout or an editable install)"
        )
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)
