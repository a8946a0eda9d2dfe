"""Quality filters: document length bounds, longest line, fraction of non-text characters."""

from __future__ import annotations

import re
from collections import Counter

from services.data_prep.ingest import Document
from shared.data.config import FilterConfig

# Control characters other than tab/newline, C1 controls, the replacement character left by
# invalid UTF-8, and private-use code points: what binary junk decoded as text looks like.
_NON_TEXT = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ufffd\ue000-\uf8ff]")
_ASCII_NON_TEXT = bytes([*range(0x00, 0x09), *range(0x0B, 0x20), 0x7F])  # the ASCII part of _NON_TEXT

REASONS = ("too_short", "too_long", "long_line", "non_text")


def non_text_fraction(text: str) -> float:
    """Fraction of characters that are control, replacement or private-use characters.

    ASCII text (most code) is counted with bytes.translate, ~10x faster than the regex.
    """
    if not text:
        return 0.0
    if text.isascii():
        data = text.encode("ascii")
        return (len(data) - len(data.translate(None, _ASCII_NON_TEXT))) / len(text)
    return len(_NON_TEXT.findall(text)) / len(text)


def longest_line(text: str) -> int:
    """Characters in the longest line (a regex `[^\n]{N}` search restarts at every position: 5x slower)."""
    return max(map(len, text.split("\n")))


def reject_reason(text: str, cfg: FilterConfig) -> str | None:
    """Why a document fails the filters, or None when it passes."""
    n = len(text)
    if n < cfg.min_doc_chars:
        return "too_short"
    if n > cfg.max_doc_chars:
        return "too_long"
    if n > cfg.max_line_chars and longest_line(text) > cfg.max_line_chars:
        return "long_line"
    if non_text_fraction(text) > cfg.max_non_text_fraction:
        return "non_text"
    return None


def quality_filter(docs: list[Document], cfg: FilterConfig) -> tuple[list[Document], Counter[str]]:
    """Documents passing every filter, in order, and the count removed per reason."""
    kept, removed = [], Counter[str]()
    for doc in docs:
        reason = reject_reason(doc.text, cfg)
        if reason is None:
            kept.append(doc)
        else:
            removed[reason] += 1
    return kept, removed
