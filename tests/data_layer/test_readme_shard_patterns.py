"""The README's brace-pattern command lines work as written: through bash, into Hydra, into shards.

Hydra's override grammar reads ``{`` as the start of a dict (``mismatched input '{'``), so a brace
pattern must reach it quoted, and bash must leave both the quotes and the braces alone.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import braceexpand
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
BIN = str(Path(sys.executable).parent)


def readme_train_lines_with_brace_shards() -> list[str]:
    """Every ``wurst-train`` line of a README bash block whose ``data.shards`` has a brace pattern."""
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), flags=re.DOTALL)
    return [line.strip() for block in blocks for line in block.splitlines()
            if line.strip().startswith("wurst-train") and re.search(r"data\.shards=\S*\{", line)]


def bash(line: str, timeout: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    return subprocess.run(["bash", "-c", line], check=False, capture_output=True, text=True, timeout=timeout, env=env)


LINES = readme_train_lines_with_brace_shards()


def test_the_readme_has_a_brace_pattern_training_line():
    assert LINES, "README.md should show data.shards with a brace pattern in a bash block"


@pytest.mark.parametrize("line", LINES)
def test_the_readme_line_reaches_hydra_with_the_pattern_intact(line):
    # Exactly as written, with Hydra printing the composed job config instead of running it.
    result = bash(line.replace("wurst-train", "wurst-train --cfg job", 1), timeout=240)
    assert result.returncode == 0, result.stderr[-2000:]
    shards = yaml.safe_load(result.stdout)["data"]["shards"]
    assert shards == "/data/laion-aesthetic/{00000..41407}.tar"
    urls = list(braceexpand.braceexpand(shards))  # what data/shard_spec.py expands it with
    assert (len(urls), urls[0], urls[-1]) == (41408, "/data/laion-aesthetic/00000.tar",
                                              "/data/laion-aesthetic/41407.tar")


@pytest.mark.slow
@pytest.mark.parametrize("line", LINES[:1])
def test_the_readme_quoting_trains_on_every_shard_of_the_pattern(line, clean_shards, tmp_path):
    # The README's quoting around a pattern over 4 real shards, on the tiny Stage A for 2 steps.
    folder, _ = clean_shards
    shards = tmp_path / "shards"
    shards.mkdir()
    for i, tar in enumerate(sorted(folder.glob("*.tar"))[:4]):
        os.symlink(tar, shards / f"{i:05d}.tar")
    ours = line.replace("/data/laion-aesthetic/{00000..41407}.tar", f"{shards}/{{00000..00003}}.tar")
    ours = ours.replace("experiment=paper_v2/stage_c_p1", "stage=a experiment=tiny")
    assert ours != line and "{00000..00003}" in ours
    ours += (f" paths.output_dir={tmp_path / 'out'} data.synthesize=null data.num_workers=0 logger=csv"
             " callbacks.progress_bar=false trainer.max_steps=2 data.filter.min_original_size=null"
             " data.global_batch_size=4")
    result = bash(ours, timeout=400)
    assert result.returncode == 0, result.stderr[-2000:]
    provenance = json.loads((tmp_path / "out" / "tiny" / "stage_a" / "export" / "provenance.json").read_text())
    assert provenance["dataset"]["shards"] == 4
