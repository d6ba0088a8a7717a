"""C4's rules (Raffel et al. 2020, section 2.2; the TensorFlow Datasets c4 builder): keep only lines that end in
terminal punctuation and have enough words (dropping "javascript" and cookie/policy lines), then reject pages
with too few sentences, "lorem ipsum" or a curly bracket. Sentences are counted as terminal punctuation
followed by a space or the end (the builder uses NLTK's sentence splitter, which needs a download)."""

from __future__ import annotations

import re

from training.data.curate.filters.lines import ends_sentence

POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")
_SENTENCE_END = re.compile(r"[.!?\u3002\uff01\uff1f]+[\"'\u201d\u2019)\]]*(?=\s|$)")


def check(text: str, cfg) -> tuple[str, str | None]:
    lower = text.lower()
    if cfg.reject_lorem_ipsum and "lorem ipsum" in lower:
        return text, "contains 'lorem ipsum'"
    if cfg.reject_curly_bracket and "{" in text:
        return text, "contains a curly bracket"
    kept = []
    for line in text.split("\n"):
        words = line.split()
        low = line.lower()
        if (
            len(words) < cfg.min_words_per_line
            or not ends_sentence(line)
            or any(len(w) > cfg.max_word_length for w in words)
            or (cfg.drop_javascript_lines and "javascript" in low)
            or (cfg.drop_policy_lines and any(p in low for p in POLICY))
        ):
            continue
        kept.append(line.strip())
    cleaned = "\n".join(kept)
    sentences = len(_SENTENCE_END.findall(cleaned))
    if sentences < cfg.min_sentences:
        return cleaned, f"{sentences} sentences left after the line rules (min_sentences {cfg.min_sentences})"
    return cleaned, None
