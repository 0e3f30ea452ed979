"""The diffusers layout of a Würstchen cascade: which folder holds which of our networks.

``WuerstchenCombinedPipeline.from_pretrained(folder)`` loads one component per entry of
``model_index.json`` from the sub-folder *of the same name*; the combined pipeline's component names
(diffusers 0.42, ``pipeline_wuerstchen_combined.py``) are those of its decoder pipeline plus the prior
pipeline's with a ``prior_`` prefix — so the prior network lives in ``prior_prior/``. The public v2
weights are instead two repositories: a ``WuerstchenDecoderPipeline`` (``decoder/``, ``vqgan/``,
``text_encoder/``, ``tokenizer/``, ``scheduler/``; its model card's ``prior:`` names the second) and a
``WuerstchenPriorPipeline`` (``prior/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``).

| our pipeline directory               | combined folder                        | class                     |
|--------------------------------------|----------------------------------------|---------------------------|
| stage_c/export/model                 | prior_prior/                           | WuerstchenPrior           |
| stage_c/export/text_encoder          | prior_text_encoder/ + prior_tokenizer/ | CLIPTextModel (bigG)      |
| stage_b/export/model                 | decoder/                               | WuerstchenDiffNeXt        |
| stage_b/export/text_encoder          | text_encoder/ + tokenizer/             | CLIPTextModel (H)         |
| stage_a/export/model                 | vqgan/                                 | PaellaVQModel             |
| (the cosine schedule, s = 0.008)     | scheduler/, prior_scheduler/           | DDPMWuerstchenScheduler   |
| stage_b/export/compressor            | semantic_compressor/ (ours; diffusers ignores it) | SemanticCompressor |
"""

from __future__ import annotations

COMBINED_PIPELINE = "WuerstchenCombinedPipeline"
DECODER_PIPELINE = "WuerstchenDecoderPipeline"
PRIOR_PIPELINE = "WuerstchenPriorPipeline"


def network_library(cls: type) -> str:
    """The ``model_index.json`` library under which the installed diffusers loads the Würstchen network ``cls``.

    diffusers (0.42, ``pipeline_loading_utils.get_class_obj_and_candidates``) resolves ``[library, class]``
    as ``diffusers.<class>`` (where the Würstchen networks were never exported, so the ``"diffusers"``
    that its own ``save_pretrained`` writes for them does not load back), as
    ``diffusers.pipelines.<library>.<class>`` (``"wuerstchen"`` in the public v2 folders, which works only
    before the move under ``pipelines.deprecated``), or as an imported module that holds both the class
    and ``ModelMixin`` — the class's own module, imported with the Würstchen pipelines.
    """
    import diffusers.pipelines

    if hasattr(diffusers.pipelines, "wuerstchen"):
        return "wuerstchen"
    return cls.__module__


def combined_components() -> dict[str, tuple[str, str]]:
    """model_index.json entries of the combined pipeline: component → (library, class)."""
    from diffusers.pipelines.deprecated.wuerstchen import PaellaVQModel, WuerstchenDiffNeXt, WuerstchenPrior

    return {
        "decoder": (network_library(WuerstchenDiffNeXt), "WuerstchenDiffNeXt"),
        "prior_prior": (network_library(WuerstchenPrior), "WuerstchenPrior"),
        "prior_scheduler": ("diffusers", "DDPMWuerstchenScheduler"),
        "prior_text_encoder": ("transformers", "CLIPTextModel"),
        "prior_tokenizer": ("transformers", "CLIPTokenizer"),
        "scheduler": ("diffusers", "DDPMWuerstchenScheduler"),
        "text_encoder": ("transformers", "CLIPTextModel"),
        "tokenizer": ("transformers", "CLIPTokenizer"),
        "vqgan": (network_library(PaellaVQModel), "PaellaVQModel"),
    }


# Folder names per stage, for each layout: (network, text encoder, tokenizer, scheduler).
# Stage A has only a network folder.
COMBINED_FOLDERS = {
    "c": ("prior_prior", "prior_text_encoder", "prior_tokenizer", "prior_scheduler"),
    "b": ("decoder", "text_encoder", "tokenizer", "scheduler"),
    "a": ("vqgan", None, None, None),
}
DECODER_FOLDERS = {
    "b": ("decoder", "text_encoder", "tokenizer", "scheduler"),
    "a": ("vqgan", None, None, None),
}
PRIOR_FOLDERS = {"c": ("prior", "text_encoder", "tokenizer", "scheduler")}

# Our additions, which diffusers' loader does not read: Stage B's semantic compressor (needed to
# train Stage C or fine-tune Stage B) and a machine-readable summary of the provenance.
COMPRESSOR_FOLDER = "semantic_compressor"
SUMMARY_FILE = "wurst.json"

# The diffusers weight and config file names.
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
DIFFUSERS_CONFIG = "config.json"
TRANSFORMERS_WEIGHTS = "model.safetensors"
SCHEDULER_CONFIG = "scheduler_config.json"
