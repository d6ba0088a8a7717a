"""FineWeb's quality filter (Penedo et al. 2024, datatrove's FineWebQualityFilter): pages whose lines rarely end a
sentence, are mostly short, repeat each other, or break every few words (lists) are removed."""

from __future__ import annotations

from training.data.curate.filters.lines import duplicated_items, ends_sentence, nonblank_lines


def check(text: str, cfg) -> tuple[str, str | None]:
    lines = nonblank_lines(text)
    if not lines:
        return text, "no lines"
    punct = sum(map(ends_sentence, lines)) / len(lines)
    if punct <= cfg.min_line_punct_ratio:
        return text, f"{punct:.0%} of lines end a sentence (min_line_punct_ratio {cfg.min_line_punct_ratio})"
    short = sum(len(line) <= cfg.short_line_chars for line in lines) / len(lines)
    if short >= cfg.max_short_line_ratio:
        return text, f"{short:.0%} of lines are short (max_short_line_ratio {cfg.max_short_line_ratio})"
    _, dup_chars = duplicated_items(lines)
    dup = dup_chars / max(1, len(text.replace("\n", "")))
    if dup >= cfg.max_dup_line_char_ratio:
        return (
            text,
            f"repeated lines hold {dup:.1%} of the characters (max_dup_line_char_ratio {cfg.max_dup_line_char_ratio})",
        )
    words = len(text.split())
    ratio = text.count("\n") / max(1, words)
    if ratio > cfg.max_newline_word_ratio:
        return text, f"{ratio:.2f} line breaks per word (max_newline_word_ratio {cfg.max_newline_word_ratio})"
    return text, None
