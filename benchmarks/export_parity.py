"""Does an exported pipeline draw in diffusers what it draws in wurst? Measured on a trained pipeline.

    python benchmarks/export_parity.py outputs/tiny [--out parity.json] [--steps 8 --decoder-steps 6]

Exports the pipeline directory with ``wurst-export`` (to a temporary folder), loads it as a user would
(``WuerstchenCombinedPipeline.from_pretrained``), and draws the same prompts — padded to 77 tokens as
always, with a negative prompt — with the same seed, steps and guidance through diffusers and through the
cascade ``wurst-generate`` builds (``load_cascade``). Prints, and writes as JSON, the max |Δ| per pixel
between the two, and how much the images depend on the prompt (the mean |Δ| between two prompts' images
at the same seed): a parity check on a pipeline whose images ignore the text would prove nothing.
Then imports the export back (``wurst-export import``) and measures the same for the imported directory.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

PROMPTS = ("a red circle on a blue background", "a yellow triangle on a black background")
NEGATIVE = "a green square on a white background"


def draw_diffusers(folder: Path, prompt: str, seed: int, settings: dict) -> torch.Tensor:
    from diffusers import WuerstchenCombinedPipeline

    pipe = WuerstchenCombinedPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        prompt, negative_prompt=NEGATIVE, height=settings["size"], width=settings["size"],
        prior_num_inference_steps=settings["steps"], prior_guidance_scale=settings["prior_w"],
        num_inference_steps=settings["decoder_steps"], decoder_guidance_scale=settings["decoder_w"],
        generator=torch.Generator().manual_seed(seed), output_type="pt",
    ).images


def draw_wurst(pipeline_dir: Path, prompt: str, seed: int, settings: dict) -> torch.Tensor:
    from wurst.train.cascade_loading import load_cascade

    cascade = load_cascade(
        pipeline_dir, sampler="paper", prior_t_grid="linear", prior_steps=settings["steps"],
        prior_guidance_scale=settings["prior_w"], decoder_steps=settings["decoder_steps"],
        decoder_guidance_scale=settings["decoder_w"], progress=False,
    )
    return cascade([prompt], settings["size"], settings["size"], generator=torch.Generator().manual_seed(seed),
                   negative_prompts=[NEGATIVE])


def compare(pipeline_dir: Path, folder: Path, settings: dict, seed: int) -> dict:
    ours = [draw_wurst(pipeline_dir, p, seed, settings) for p in PROMPTS]
    theirs = [draw_diffusers(folder, p, seed, settings) for p in PROMPTS]
    return {
        "max_abs_difference": max(float((o - t).abs().max()) for o, t in zip(ours, theirs, strict=True)),
        "prompt_effect_mean_abs": float((ours[0] - ours[1]).abs().mean()),
        "prompt_effect_max_abs": float((ours[0] - ours[1]).abs().max()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pipeline_dir", type=Path)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8, help="Stage C steps (linear grid)")
    parser.add_argument("--decoder-steps", type=int, default=6)
    parser.add_argument("--prior-w", type=float, default=4.0)
    parser.add_argument("--decoder-w", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    from wurst.models.hub.diffusers_export import export_pipeline
    from wurst.models.hub.diffusers_import import import_diffusers

    settings = {"size": args.size, "steps": args.steps, "decoder_steps": args.decoder_steps,
                "prior_w": args.prior_w, "decoder_w": args.decoder_w}
    with tempfile.TemporaryDirectory() as tmp:
        exported = export_pipeline(args.pipeline_dir, Path(tmp) / "export")
        result = {"settings": settings, "negative_prompt": NEGATIVE, "prompts": list(PROMPTS),
                  "export": compare(args.pipeline_dir, exported, settings, args.seed)}
        imported = import_diffusers(exported, Path(tmp) / "imported")
        result["import"] = compare(imported, exported, settings, args.seed)
    print(json.dumps(result, indent=2))
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
