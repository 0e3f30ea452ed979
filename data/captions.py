"""Caption cleaning for LAION alt-texts.

Alt-texts arrive with HTML entities (``&amp;``), mojibake from wrong encodings and runs of
whitespace/newlines; the text encoder should see the sentence a person wrote. Nothing here changes
words, so a clean caption stays the caption.
"""

from __future__ import annotations

import html
import re

import ftfy

_WHITESPACE = re.compile(r"\s+")


def clean_caption(text: str | bytes) -> str:
    """Decode (UTF-8, replacing bad bytes), unescape HTML, repair mojibake, collapse whitespace."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    text = ftfy.fix_text(html.unescape(text))
    return _WHITESPACE.sub(" ", text).strip()
