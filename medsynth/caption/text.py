"""Caption text rules: cleaning, the required class prefix, and the T5 token limit.

Tokens are counted the way PixArt-alpha encodes a prompt: the base model's T5 tokenizer with
its special tokens (T5 appends ``</s>``), so a caption of ``n_tokens <= limit`` reaches the
text encoder without being cut.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Sequence

# A sentence ends at . ! ? (optionally followed by a closing quote/bracket) before whitespace or the end.
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*(?=\s|$)")


def clean(text: str) -> str:
    """Drop control/format characters and collapse whitespace (VLMs emit stray newlines and tabs)."""
    kept = "".join(ch if not unicodedata.category(ch).startswith("C") else " " for ch in text)
    return " ".join(kept.split())


def _norm(text: str) -> str:
    return " ".join(text.split()).casefold()


def has_prefix(caption: str, prefix: str) -> bool:
    """Does ``caption`` start with ``prefix``? Case-insensitive and whitespace-tolerant.

    The prefix must end at a word boundary: 'A dermoscopic image of melanomas' does not
    start with 'A dermoscopic image of melanoma'.
    """
    c, p = _norm(caption), _norm(prefix)
    if not c.startswith(p):
        return False
    rest = c[len(p):]
    return not rest or not rest[0].isalnum()


def ensure_prefix(caption: str, prefix: str) -> str:
    """``caption`` if it has the prefix, else 'prefix. caption'."""
    caption = clean(caption)
    if has_prefix(caption, prefix):
        return caption
    if not caption:
        return prefix + "."
    return f"{prefix}. {caption}"


class TokenCounter:
    """Counts tokens with a Hugging Face tokenizer exactly as the text encoder will see them."""

    def __init__(self, tokenizer, limit: int):
        self.tokenizer = tokenizer
        self.limit = int(limit)

    def count(self, texts: Sequence[str]) -> list[int]:
        if not texts:
            return []
        # verbose=False: counting past model_max_length is the point here, not a mistake to warn about.
        enc = self.tokenizer(list(texts), add_special_tokens=True, truncation=False, verbose=False)
        return [len(ids) for ids in enc["input_ids"]]

    def count1(self, text: str) -> int:
        return self.count([text])[0]

    def fits(self, text: str) -> bool:
        return self.count1(text) <= self.limit


def _longest_fitting(candidates: Sequence[str], fits: Callable[[str], bool]) -> str | None:
    """Longest of increasing-length ``candidates`` that fits (token count grows with length)."""
    lo, hi, best = 0, len(candidates) - 1, None
    while lo <= hi:
        mid = (lo + hi) // 2
        if fits(candidates[mid]):
            best, lo = candidates[mid], mid + 1
        else:
            hi = mid - 1
    return best


def cut_to_fit(text: str, counter: TokenCounter) -> tuple[str, str]:
    """Shorten ``text`` until it fits the token limit; returns (text, how it was cut).

    Cuts at the last sentence boundary under the limit ('sentence'); when not even the first
    sentence fits, at the last word boundary ('word'); when not even the first word fits
    (gibberish without spaces), at the last character that fits ('char').
    """
    text = clean(text)
    if counter.fits(text):
        return text, "none"
    ends = [m.end() for m in _SENTENCE_END.finditer(text)]
    best = _longest_fitting([text[:e] for e in ends], counter.fits)
    if best:
        return best, "sentence"
    words = text.split(" ")
    best = _longest_fitting([" ".join(words[: i + 1]) for i in range(len(words))], counter.fits)
    if best:
        return best, "word"
    best = _longest_fitting([text[: i + 1] for i in range(len(text))], counter.fits)
    return (best or ""), "char"
