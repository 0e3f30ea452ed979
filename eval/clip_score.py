"""CLIP score: how well an image matches its caption, with transformers or open_clip CLIP models.

CLIP score as torchmetrics defines it (after Hessel et al. 2021, "CLIPScore"): per image–caption pair
100 · max(cos(image embedding, text embedding), 0), averaged over the pairs. torchmetrics'
``CLIPScore`` cannot be used as is: with transformers ≥ 5, ``get_image_features`` returns a model
output rather than a tensor, which it does not unwrap, and it has no open_clip path. The same formula
is computed here, and tested equal to torchmetrics' ``CLIPScore`` given tensor-valued features.

Models: ``backend="transformers"`` takes a Hub name or a local folder with ``config.json`` and weights
(+ preprocessor/tokenizer files, or a separate ``processor`` name/folder; the default is torchmetrics'
``openai/clip-vit-large-patch14``);
``backend="open_clip"`` takes an open_clip model name with ``pretrained`` (a tag or a weights file),
``local-dir:<folder>`` or a folder holding ``open_clip_config.json`` and weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

BACKENDS = ("transformers", "open_clip")


def looks_like_path(name: str) -> bool:
    """A name meant as a local folder rather than a Hub id (absolute, ./, ../, ~ or existing)."""
    return name.startswith(("/", "./", "../", "~")) or Path(name).expanduser().exists()


def load_transformers_clip(model: str, processor: str | None = None, what: str = "CLIP") -> tuple[Any, Any]:
    """``(CLIPModel, processor)`` from Hub names or local folders, eval mode; clear errors offline."""
    from transformers import AutoProcessor, CLIPModel

    loaded = []
    for kind, name, loader in (("model", model, CLIPModel), ("processor", processor or model, AutoProcessor)):
        if looks_like_path(name) and not Path(name).expanduser().is_dir():
            raise FileNotFoundError(f"{what} {kind} folder {name} does not exist")
        local = looks_like_path(name)
        try:
            loaded.append(loader.from_pretrained(str(Path(name).expanduser()) if local else name))
        except OSError as error:
            fix = (
                f"the folder lacks the {kind} files; point the {kind} setting at a folder that has them"
                if local
                else f"offline, download it once (`hf download {name} --local-dir DIR`) and pass DIR"
            )
            raise OSError(f"could not load the {what} {kind} {name!r}: {fix} ({error})") from error
    clip, proc = loaded
    return clip.eval().requires_grad_(False), proc


def transformers_embeddings(
    model: Any, processor: Any, images: Sequence[Image.Image], captions: Sequence[str], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised image and text embeddings ``([B, D], [B, D])`` of a transformers CLIP model."""
    max_length = model.config.text_config.max_position_embeddings
    image_inputs = processor(images=list(images), return_tensors="pt")
    text_inputs = processor(
        text=list(captions), padding=True, truncation=True, max_length=max_length, return_tensors="pt"
    )
    with torch.inference_mode():
        image = _tensor(model.get_image_features(pixel_values=image_inputs["pixel_values"].to(device)))
        text = _tensor(
            model.get_text_features(
                input_ids=text_inputs["input_ids"].to(device),
                attention_mask=text_inputs["attention_mask"].to(device),
            )
        )
    return _normalise(image), _normalise(text)


def _tensor(output: Any) -> torch.Tensor:
    # transformers ≥ 5 wraps the projected embedding in a model output (``pooler_output``).
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return x.float() / x.float().norm(dim=-1, keepdim=True)


def _check_pairs(images: Sequence[Image.Image], captions: Sequence[str]) -> None:
    if len(images) != len(captions):
        raise ValueError(f"got {len(images)} images but {len(captions)} captions; they are scored in pairs")
    if isinstance(captions, str):
        raise TypeError("captions must be a list of strings, not one string")


class ClipScore:
    """Mean CLIP score of image–caption pairs; ``update`` over batches, ``compute`` at the end."""

    def __init__(
        self,
        model: str = "openai/clip-vit-large-patch14",
        backend: str = "transformers",
        pretrained: str | None = None,
        device: str | torch.device = "cpu",
        processor: str | None = None,
    ):
        if backend not in BACKENDS:
            raise ValueError(f"CLIP score backend must be one of {BACKENDS}, got {backend!r}")
        self.backend, self.device = backend, torch.device(device)
        if backend == "transformers":
            if pretrained is not None:
                raise ValueError(
                    "`pretrained` is for the open_clip backend; for transformers pass a name or folder"
                )
            self.model, self.processor = load_transformers_clip(model, processor, what="CLIP score")
        else:
            if processor is not None:
                raise ValueError(
                    "`processor` is for the transformers backend; open_clip models bring their own"
                )
            self.model, self.preprocess, self.tokenizer = _load_open_clip(model, pretrained)
        self.model.to(self.device)
        self.reset()

    def reset(self) -> None:
        self._sum, self._count = 0.0, 0

    def embeddings(
        self, images: Sequence[Image.Image], captions: Sequence[str]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """L2-normalised ``(image [B, D], text [B, D])``."""
        _check_pairs(images, captions)
        if self.backend == "transformers":
            return transformers_embeddings(self.model, self.processor, images, captions, self.device)
        with torch.inference_mode():
            pixels = torch.stack([self.preprocess(image.convert("RGB")) for image in images]).to(self.device)
            image = self.model.encode_image(pixels)
            text = self.model.encode_text(self.tokenizer(list(captions)).to(self.device))
        return _normalise(image), _normalise(text)

    def score(self, images: Sequence[Image.Image], captions: Sequence[str]) -> torch.Tensor:
        """Per-pair CLIP score ``[B]``: 100 · max(cos, 0)."""
        image, text = self.embeddings(images, captions)
        return (100 * (image * text).sum(dim=-1)).clamp(min=0).cpu()

    def update(self, images: Sequence[Image.Image], captions: Sequence[str]) -> None:
        scores = self.score(images, captions)
        self._sum += float(scores.sum())
        self._count += len(scores)

    def compute(self) -> float:
        if self._count == 0:
            raise RuntimeError("CLIP score: no image–caption pairs were given to update()")
        return self._sum / self._count


def _load_open_clip(model: str, pretrained: str | None) -> tuple[Any, Any, Any]:
    import open_clip

    if not model.startswith(("local-dir:", "hf-hub:")) and looks_like_path(model):
        folder = Path(model).expanduser()
        if not (folder / "open_clip_config.json").is_file():
            raise FileNotFoundError(
                f"open_clip model folder {folder} needs open_clip_config.json and weights (as open_clip's "
                "push_to_hf_hub writes them)"
            )
        model = f"local-dir:{folder}"
    if pretrained is not None and looks_like_path(pretrained) and not Path(pretrained).expanduser().is_file():
        raise FileNotFoundError(f"open_clip pretrained weights file {pretrained} does not exist")
    try:
        clip, _, preprocess = open_clip.create_model_and_transforms(model, pretrained=pretrained)
    except (OSError, RuntimeError) as error:
        raise OSError(
            f"could not load open_clip model {model!r} (pretrained={pretrained!r}): {error}. Without network "
            "access pass pretrained=<weights file> or a local folder"
        ) from error
    return clip.eval().requires_grad_(False), preprocess, open_clip.get_tokenizer(model)
