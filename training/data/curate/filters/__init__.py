"""Quality filters. Each is `check(text, cfg) -> (text, reason)`: reason None keeps the document; a filter
may also rewrite the text (c4 drops lines). They run in FILTERS' order, cheapest first, and the first reason
removes the document under that filter's name (stats.json `filtered`, removed.jsonl `reason`).

    code               The Stack / StarCoder: line lengths, alphanumeric share, auto-generated, encoded data
    gopher_quality     Gopher (Rae et al. 2021): word counts and lengths, symbols, bullets, stop words
    gopher_repetition  Gopher: duplicated lines, paragraphs and n-grams
    c4                 C4 (Raffel et al. 2020): line rules, then page rules
    fineweb            FineWeb (Penedo et al. 2024): line punctuation, short lines, duplicated lines, lists

The prose filters (gopher_*, c4, fineweb) are off by default: the demo corpus is code, which they reject
nearly whole (docs/data.md has the figures).
"""

from __future__ import annotations

from typing import Callable, Optional

from training.data.curate.filters import c4, code, fineweb, gopher

Check = Callable[[str, object], tuple[str, Optional[str]]]

FILTERS: dict[str, Check] = {
    "code": code.check,
    "gopher_quality": gopher.quality,
    "gopher_repetition": gopher.repetition,
    "c4": c4.check,
    "fineweb": fineweb.check,
}


def apply_filters(text: str, filters_cfg) -> tuple[str, Optional[str]]:
    """(text after the filters that rewrite, "name: why" of the first filter that rejects it, or None)."""
    for name, check in FILTERS.items():
        cfg = filters_cfg[name]
        if cfg.enabled:
            text, why = check(text, cfg)
            if why:
                return text, f"{name}: {why}"
    return text, None
