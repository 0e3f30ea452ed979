"""The end of a pipeline run: a grid of cascade samples for fixed prompts, the prompt check on the
tiny pipeline, the carbon ledger, and where everything is."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torchvision.utils import make_grid, save_image

from wurst.train.cascade_loading import load_cascade
from wurst.train.previews import PreviewError
from wurst.train.report_figures import write_report_figure

log = logging.getLogger(__name__)


def sample_grid(pipeline_dir: Path, prompts: list[str], sampler: str, size: int, per_prompt: int = 4,
                seed: int = 0) -> Path:
    """Rows: prompts; columns: seeds. Written to ``<pipeline_dir>/samples.png``."""
    cascade = load_cascade(pipeline_dir, sampler=sampler, progress=False)
    rows = []
    for i, prompt in enumerate(prompts):
        generators = [torch.Generator().manual_seed(seed + 1000 * i + j) for j in range(per_prompt)]
        rows.append(cascade([prompt] * per_prompt, size, size, generator=generators))
    path = pipeline_dir / "samples.png"
    save_image(make_grid(torch.cat(rows), nrow=per_prompt, padding=2), path)
    # The same images labelled with their prompts, beside each stage's loss curves.
    write_report_figure(pipeline_dir / "report.png", pipeline_dir, torch.cat(rows), prompts, per_prompt)
    return path


def report_pipeline(cfg: DictConfig, result: dict[str, Any]) -> dict[str, Any]:
    """Sample grid, prompt check, carbon ledger, the manifest's report. Every export is already written,
    so a part that fails is logged and skipped, the others still run, and the failures (with any stage
    preview that failed) end the command with an error once the report is written."""
    pipeline_dir = Path(result["pipeline_dir"])
    report = cfg.pipeline.get("report", {})
    sampler = report.get("sampler", "tiny")
    size = int(report.get("size", 128))
    lines = [f"pipeline {cfg.pipeline.name}: {pipeline_dir}"]
    summary: dict[str, Any] = {}
    failures: list[str] = [f"{phase} preview: {error}" for phase, error in (result.get("preview_errors") or {}).items()]

    def attempt(what: str, part) -> None:
        try:
            part()
        except Exception as error:
            log.exception("pipeline report: the %s failed; the exports are not affected", what)
            failures.append(f"{what}: {type(error).__name__}: {error}")
            lines.append(f"  {what:<16} FAILED ({type(error).__name__}: {error})")

    def grid() -> None:
        path = sample_grid(pipeline_dir, list(cfg.samples_prompts), sampler, size)
        lines.append(f"  sample grid      {path}  (labelled, beside the loss curves: {pipeline_dir / 'report.png'})")
        summary["sample_grid"] = str(path)
        summary["report_figure"] = str(pipeline_dir / "report.png")

    def curves() -> None:  # from the CSV logs alone, so they exist even when the cascade cannot sample
        path = write_report_figure(pipeline_dir / "loss_curves.png", pipeline_dir, None, [], 0)
        if path is not None:  # no stage has CSV logs: nothing to plot
            lines.append(f"  loss curves      {path}")
            summary["loss_curves"] = str(path)

    def prompt_check() -> None:  # background, foreground and shape read from the images, per stage
        from wurst.train.prompt_fidelity import prompt_fidelity, summary_lines

        check = prompt_fidelity(pipeline_dir, count=report.get("prompt_count", 96), size=size, sampler=sampler)
        summary["prompt_fidelity"] = check
        (pipeline_dir / "prompt_fidelity.json").write_text(json.dumps(check, indent=2))
        lines.extend("  " + line for line in summary_lines(check))

    def ledger() -> None:
        from wurst.train.accounting.pipeline import pipeline_table

        (pipeline_dir / "ledger.md").write_text(pipeline_table(pipeline_dir) + "\n")
        lines.append(f"  carbon ledger    {pipeline_dir / 'ledger.md'}")
        summary["ledger"] = str(pipeline_dir / "ledger.md")

    attempt("loss curves", curves)
    attempt("sample grid", grid)
    if report.get("prompt_check", False):
        attempt("prompt check", prompt_check)
    attempt("carbon ledger", ledger)
    for stage in ("a", "b", "c"):
        stage_dir = pipeline_dir / f"stage_{stage}"
        if stage_dir.is_dir():
            lines.append(f"  stage {stage.upper()}          export {stage_dir / 'export'}  logs {stage_dir / 'logs'}")
    lines.append(f"  generate more    wurst-generate {pipeline_dir} --prompt \"a red circle on a blue background\"")
    print("\n".join(lines))

    accounting: dict[str, Any] = {}

    def account() -> None:
        from wurst.train.accounting.pipeline import read_pipeline

        accounting.update(read_pipeline(pipeline_dir).to_dict())

    attempt("accounting", account)
    manifest_path = pipeline_dir / "pipeline.json"
    content = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    content["report"] = {**summary, **({"failures": failures} if failures else {})}
    if accounting:
        content["accounting"] = accounting
    manifest_path.write_text(json.dumps(content, indent=2))
    if failures:
        message = (
            f"pipeline {cfg.pipeline.name}: every stage's export is written ({pipeline_dir}), but "
            f"{len(failures)} preview/report part(s) failed (tracebacks above): " + "; ".join(failures)
        )
        log.error(message)
        raise PreviewError(message)
    return summary
