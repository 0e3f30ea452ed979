"""``trainer.max_steps <= 0`` is refused before anything is built or written.

0 steps used to run to completion and write a complete-looking export of untrained weights; -1 is
Lightning's "no limit", which on an endless resampled stream never ends. A real ``wurst-train``.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


@pytest.mark.parametrize("max_steps", ["0", "-1"])
def test_a_stage_run_without_positive_max_steps_is_refused_naming_the_key(tmp_path, max_steps):
    argv = [sys.executable, "-m", "wurst.train", "stage=a", "experiment=tiny", "logger=csv",
            f"paths.output_dir={tmp_path / 'out'}", f"paths.data_dir={tmp_path / 'data'}",
            f"trainer.max_steps={max_steps}"]
    result = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode != 0
    assert f"trainer.max_steps={max_steps}: a stage run needs a positive number" in result.stderr
    # refused before the run directory, the synthetic shards or any export exist
    assert not (tmp_path / "out" / "tiny" / "stage_a").exists()
    assert not (tmp_path / "data").exists()
