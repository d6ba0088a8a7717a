"""Gopher's quality and repetition rules (Rae et al. 2021, appendix A.1.1), on whitespace-separated words."""

from __future__ import annotations

from collections import Counter

from training.data.curate.filters.lines import duplicated_items, nonblank_lines

STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})
BULLETS = ("\u2022", "-", "*", "\u2023", "\u2043", "\u25e6")
ELLIPSES = ("...", "\u2026")


def quality(text: str, cfg) -> tuple[str, str | None]:
    words = text.split()
    n = len(words)
    if not cfg.min_words <= n <= cfg.max_words:
        return text, f"{n} words (min_words {cfg.min_words}, max_words {cfg.max_words})"
    mean = sum(map(len, words)) / n
    if not cfg.min_mean_word_length <= mean <= cfg.max_mean_word_length:
        return text, f"mean word length {mean:.1f}"
    symbols = (text.count("#") + text.count("...") + text.count("\u2026")) / n
    if symbols > cfg.max_symbol_word_ratio:
        return text, f"symbol/word ratio {symbols:.2f} (max_symbol_word_ratio {cfg.max_symbol_word_ratio})"
    lines = nonblank_lines(text)
    bullets = sum(line.lstrip().startswith(BULLETS) for line in lines) / max(1, len(lines))
    if bullets > cfg.max_bullet_lines_ratio:
        return text, f"{bullets:.0%} of lines are bullets"
    ellipsis = sum(line.rstrip().endswith(ELLIPSES) for line in lines) / max(1, len(lines))
    if ellipsis > cfg.max_ellipsis_lines_ratio:
        return text, f"{ellipsis:.0%} of lines end in an ellipsis"
    alpha = sum(any(c.isalpha() for c in w) for w in words) / n
    if alpha < cfg.min_alpha_words_ratio:
        return text, f"{alpha:.0%} of words have a letter (min_alpha_words_ratio {cfg.min_alpha_words_ratio})"
    stops = sum(w.lower() in STOP_WORDS for w in words)
    if stops < cfg.min_stop_words:
        return text, f"{stops} stop words (min_stop_words {cfg.min_stop_words})"
    return text, None


def repetition(text: str, cfg) -> tuple[str, str | None]:
    for unit, items, max_frac, max_chars in (
        ("line", nonblank_lines(text), cfg.max_dup_line_fraction, cfg.max_dup_line_char_fraction),
        (
            "paragraph",
            [p for p in text.split("\n\n") if p.strip()],
            cfg.max_dup_para_fraction,
            cfg.max_dup_para_char_fraction,
        ),
    ):
        dups, chars = duplicated_items(items)
        if items and dups / len(items) > max_frac:
            return text, f"{dups / len(items):.0%} of {unit}s are repeated"
        if chars / max(1, len(text)) > max_chars:
            return text, f"repeated {unit}s hold {chars / max(1, len(text)):.0%} of the characters"
    words = text.split()
    total = sum(map(len, words)) or 1
    for n, limit in zip((2, 3, 4), cfg.top_ngram_char_fractions):
        grams = Counter(zip(*(words[i:] for i in range(n))))
        if grams:
            gram, count = grams.most_common(1)[0]
            share = sum(map(len, gram)) * count / total
            if share > limit:
                return text, f"the most common {n}-gram covers {share:.0%} of the characters"
    for n, limit in zip(range(5, 11), cfg.dup_ngram_char_fractions):
        share = _duplicated_ngram_share(words, n) / total
        if share > limit:
            return text, f"repeated {n}-grams cover {share:.0%} of the characters"
    return text, None


def _duplicated_ngram_share(words: list[str], n: int) -> int:
    """Characters of the words inside n-grams that occur more than once (each word counted once)."""
    grams = list(zip(*(words[i:] for i in range(n))))
    counts = Counter(grams)
    covered = [False] * len(words)
    for i, gram in enumerate(grams):
        if counts[gram] > 1:
            covered[i : i + n] = [True] * n
    return sum(len(w) for w, c in zip(words, covered) if c)
