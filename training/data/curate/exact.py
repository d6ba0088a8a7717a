"""Exact deduplication's key: a 128-bit hash of the content, after whitespace normalization if asked.

Normalizing strips each line's trailing spaces, collapses runs of blank lines and of spaces and tabs inside
lines (not the indentation) to one, and ignores leading/trailing blank lines: a re-indented copy is not exact,
a copy with trailing whitespace, Windows line ends or an extra blank line is.
"""

from __future__ import annotations

import re

import xxhash

_SPACES = re.compile(r"(?<=\S)[ \t]+")  # inside a line: indentation is kept, it is meaningful in code
_BLANK_LINES = re.compile(r"\n{2,}")


def normalize_whitespace(text: str) -> str:
    lines = (_SPACES.sub(" ", line).rstrip() for line in text.replace("\r\n", "\n").split("\n"))
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip("\n")


def content_hash(text: str, whitespace: bool) -> tuple[int, int]:
    """(high, low) 64-bit halves of xxh3-128: two uint64 columns in the shard index."""
    digest = xxhash.xxh3_128_intdigest(normalize_whitespace(text) if whitespace else text)
    return digest >> 64, digest & ((1 << 64) - 1)
