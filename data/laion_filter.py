"""The LAION metadata filter (REFERENCE.md "Data"), applied to the json before the image is decoded.

A sample is kept when ``original_width`` and ``original_height`` are within [512, 4096],
``pwatermark`` <= 0.5, ``punsafe`` <= 0.99 and its aesthetic score (``aesthetic`` or
``AESTHETIC_SCORE``, whichever img2dataset kept) >= 5.0; a missing, null, NaN or infinite field fails
its rule (numbers written as strings count as numbers).
Optional caption rules: a minimum word count, ASCII only, forbidden substrings. The defaults below are
the official numbers; ``conf/data/filter/laion.yaml`` is where a run sets them, and a phase overrides
one (Stage C's aesthetic fine-tune raises ``min_aesthetic``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

# Rule names in the order they are checked; a rejected sample is counted under the first it fails.
RULES = ("size", "watermark", "unsafe", "aesthetic", "caption_words", "caption_ascii", "caption_forbidden")


def _number(meta: Mapping, key: str) -> float | None:
    value = meta.get(key)
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None  # json.loads reads NaN and Infinity too


@dataclass
class LAIONFilter:
    """Thresholds on img2dataset's LAION json; ``None`` switches a rule off."""

    min_original_size: int | None = 512
    max_original_size: int | None = 4096
    max_pwatermark: float | None = 0.5
    max_punsafe: float | None = 0.99
    min_aesthetic: float | None = 5.0
    aesthetic_keys: Sequence[str] = ("aesthetic", "AESTHETIC_SCORE")
    min_caption_words: int | None = None
    ascii_only: bool = False
    forbidden_substrings: Sequence[str] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        self.aesthetic_keys = tuple(self.aesthetic_keys)
        self.forbidden_substrings = tuple(s.lower() for s in self.forbidden_substrings)
        if not self.aesthetic_keys and self.min_aesthetic is not None:
            raise ValueError("data.filter.aesthetic_keys is empty but min_aesthetic is set; name the json "
                             "field(s) holding the aesthetic score, e.g. [aesthetic, AESTHETIC_SCORE]")
        if (self.min_original_size is not None and self.max_original_size is not None
                and self.min_original_size > self.max_original_size):
            raise ValueError(f"data.filter.min_original_size={self.min_original_size} exceeds "
                             f"max_original_size={self.max_original_size}; swap or fix them")

    def aesthetic_score(self, meta: Mapping) -> float | None:
        for key in self.aesthetic_keys:
            score = _number(meta, key)
            if score is not None:
                return score
        return None

    def _size_ok(self, meta: Mapping) -> bool:
        for key in ("original_width", "original_height"):
            side = _number(meta, key)
            if side is None:
                return False
            if self.min_original_size is not None and side < self.min_original_size:
                return False
            if self.max_original_size is not None and side > self.max_original_size:
                return False
        return True

    def rejection(self, meta: Mapping, caption: str = "") -> str | None:
        """The first rule (a name from ``RULES``) this sample fails, or None when it is kept."""
        if (self.min_original_size is not None or self.max_original_size is not None) and not self._size_ok(meta):
            return "size"
        if self.max_pwatermark is not None:
            value = _number(meta, "pwatermark")
            if value is None or value > self.max_pwatermark:
                return "watermark"
        if self.max_punsafe is not None:
            value = _number(meta, "punsafe")
            if value is None or value > self.max_punsafe:
                return "unsafe"
        if self.min_aesthetic is not None:
            score = self.aesthetic_score(meta)
            if score is None or score < self.min_aesthetic:
                return "aesthetic"
        if self.min_caption_words is not None and len(caption.split()) < self.min_caption_words:
            return "caption_words"
        if self.ascii_only and not caption.isascii():
            return "caption_ascii"
        if self.forbidden_substrings:
            lowered = caption.lower()
            if any(s in lowered for s in self.forbidden_substrings):
                return "caption_forbidden"
        return None

    def active_rules(self) -> list[str]:
        """The rules (names from RULES) this filter applies."""
        on = {"size": self.min_original_size is not None or self.max_original_size is not None,
              "watermark": self.max_pwatermark is not None, "unsafe": self.max_punsafe is not None,
              "aesthetic": self.min_aesthetic is not None, "caption_words": self.min_caption_words is not None,
              "caption_ascii": self.ascii_only, "caption_forbidden": bool(self.forbidden_substrings)}
        return [rule for rule in RULES if on[rule]]

    def describe(self) -> str:
        """The active thresholds, for error messages."""
        parts = [f"original size in [{self.min_original_size}, {self.max_original_size}]",
                 f"pwatermark <= {self.max_pwatermark}", f"punsafe <= {self.max_punsafe}",
                 f"{'/'.join(self.aesthetic_keys)} >= {self.min_aesthetic}"]
        if self.min_caption_words is not None:
            parts.append(f"caption words >= {self.min_caption_words}")
        if self.ascii_only:
            parts.append("ASCII captions")
        if self.forbidden_substrings:
            parts.append(f"no caption containing {list(self.forbidden_substrings)}")
        return ", ".join(parts)
