"""PickScore (Kirstain et al. 2023, "Pick-a-Pic"): a CLIP-H fine-tuned on human image preferences.

Scored as its authors do: image and caption embeddings of the PickScore model are L2-normalised and
the score is ``logit_scale.exp() · cos``; between two images for the same caption, the softmax over
their scores is the probability that people prefer each. The paper (REFERENCE.md "Evaluation")
reports that PickScore prefers Würstchen's images to Stable Diffusion 1.4 / 2.1 on COCO-30K
captions: :func:`preference` gives that number for our images against another model's.

Model ``yuvalkirstain/PickScore_v1`` with the processor of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``;
both accept local folders (``hf download <name> --local-dir DIR``) for clusters without network.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image

from wurst.eval.clip_score import load_transformers_clip, transformers_embeddings

PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


class PickScore:
    """Mean PickScore of image–caption pairs; ``score`` gives the per-pair values ``[B]``."""

    def __init__(
        self,
        model: str = PICKSCORE_MODEL,
        processor: str = PICKSCORE_PROCESSOR,
        device: str | torch.device = "cpu",
    ):
        self.device = torch.device(device)
        self.model, self.processor = load_transformers_clip(model, processor, what="PickScore")
        self.model.to(self.device)
        self.reset()

    def reset(self) -> None:
        self._scores: list[torch.Tensor] = []

    def score(self, images: Sequence[Image.Image], captions: Sequence[str]) -> torch.Tensor:
        """Per-pair PickScore ``[B]`` = logit_scale.exp() · cos(image, caption)."""
        if len(images) != len(captions):
            raise ValueError(
                f"got {len(images)} images but {len(captions)} captions; they are scored in pairs"
            )
        image, text = transformers_embeddings(self.model, self.processor, images, captions, self.device)
        return (self.model.logit_scale.exp().float() * (image * text).sum(dim=-1)).cpu()

    def update(self, images: Sequence[Image.Image], captions: Sequence[str]) -> torch.Tensor:
        scores = self.score(images, captions)
        self._scores.append(scores)
        return scores

    def scores(self) -> torch.Tensor:
        """All per-pair scores given to ``update`` so far, in order ``[N]``."""
        return torch.cat(self._scores) if self._scores else torch.empty(0)

    def compute(self) -> float:
        if not self._scores:
            raise RuntimeError("PickScore: no image–caption pairs were given to update()")
        return float(self.scores().mean())


def preference(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """Mean probability that our image is preferred, softmax over the two PickScores per caption.

    ``ours``, ``theirs``: ``[N]`` scores of two models' images for the same N captions.
    """
    if ours.shape != theirs.shape or ours.ndim != 1 or len(ours) == 0:
        raise ValueError(
            f"preference needs two equal-length 1-d score vectors for the same captions, got "
            f"{tuple(ours.shape)} and {tuple(theirs.shape)}"
        )
    return float(torch.softmax(torch.stack([ours, theirs], dim=-1), dim=-1)[:, 0].mean())
