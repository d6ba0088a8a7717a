"""Line and word statistics the filters share."""

from __future__ import annotations

from collections import Counter

# Terminal punctuation, ASCII and the common CJK / full-width forms; a closing quote may follow.
TERMINAL = (".", "!", "?", "\u3002", "\uff01", "\uff1f", "\u2026")
CLOSERS = "\"'\u201d\u2019)]"


def ends_sentence(line: str) -> bool:
    return line.rstrip().rstrip(CLOSERS).endswith(TERMINAL)


def nonblank_lines(text: str) -> list[str]:
    return [line for line in text.split("\n") if line.strip()]


def duplicated_items(items: list[str]) -> tuple[int, int]:
    """(how many items repeat an earlier one, their characters), as Gopher counts duplicated lines."""
    counts = Counter(items)
    dups = chars = 0
    for item, n in counts.items():
        if n > 1:
            dups += n - 1
            chars += len(item) * (n - 1)
    return dups, chars
