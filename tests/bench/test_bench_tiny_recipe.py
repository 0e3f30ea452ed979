"""benchmarks/bench_tiny_recipe.py: where a tiny pipeline's minutes went, from its exports."""

from __future__ import annotations

import json

from benchmarks.bench_tiny_recipe import recipe_steps, run_table


def test_recipe_steps_are_the_tiny_recipe_stage_configs():
    steps = recipe_steps()
    assert set(steps) == {"a", "b", "c"} and all(n > 0 for n in steps.values())


def test_run_table_reports_steps_per_second_per_stage_and_the_prompt_check(tmp_path):
    for stage, steps, hours in (("a", 250, 0.05), ("b", 1500, 0.1)):
        export = tmp_path / f"stage_{stage}" / "export"
        export.mkdir(parents=True)
        (export / "provenance.json").write_text(json.dumps(
            {"steps": steps, "accounting": {"wall_hours": hours, "samples_per_s": 12.5}}))
    (tmp_path / "pipeline.json").write_text(json.dumps({"wall_seconds": 900}))
    figures = {"images": 4, "background": 1.0, "foreground": 0.5, "shape": 0.25, "all_three": 0.25}
    check = {"reader": figures, "stage_a": {**figures, "psnr_db": 20.0}, "stage_b": figures, "cascade": figures,
             "limit": "Stage B (decoding true compressor latents): all three right 25% -> 25%"}
    (tmp_path / "prompt_fidelity.json").write_text(json.dumps(check))
    table, result = run_table(tmp_path)
    assert result["stages"]["a"] == {"steps": 250, "wall_min": 3.0, "steps_per_s": 1.39, "samples_per_s": 12.5}
    assert result["stages"]["b"]["steps_per_s"] == round(1500 / 360, 2) and "c" not in result["stages"]
    assert result["pipeline_wall_min"] == 15.0
    assert "| A | 250 | 3.0 | 1.39 |" in table and "Stage B ceiling" in table and "PSNR 20.0 dB" in table
