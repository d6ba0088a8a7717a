"""Collapse: a policy that satisfies its reward with one short answer for everything.

The demo's GRPO once raised "parses" to 1.0 by answering every prompt with `return self`, and the eval
report called that a success. Two numbers catch it, for GRPO's logs (per group) and the eval report (per task):

    distinct_frac  distinct completions over completions, per group (GRPO) or over a task's prompts (eval)
    len_ratio      mean completion length over mean reference length (characters), when every record
                   has a reference (the real function or body), each reference cut to the tokens a
                   completion may have (within_budget): a whole 3,320-character body against a 128-token
                   completion made even the reference itself read as collapsed

Below DISTINCT_MIN or LENGTH_MIN, the completions have collapsed: whatever else improved is suspect.
"""

from __future__ import annotations

from typing import Optional, Sequence


class CollapseError(ValueError):
    """A run whose completions collapsed, stopped on purpose: a user error (exit 2), not a crash to retry."""


DISTINCT_MIN = 0.5  # under half the completions distinct: the policy says one thing
LENGTH_MIN = 0.3  # under 30% of the reference's length: it stopped writing the function
STATS = ("distinct_frac", "len_ratio")


def collapse_stats(texts: Sequence[str], group_size: int, references: Sequence[Optional[str]] = ()) -> dict[str, float]:
    """distinct_frac averaged over consecutive groups of group_size texts; len_ratio when every text has
    a reference (references empty or holding a None: not computed)."""
    groups = [texts[i : i + group_size] for i in range(0, len(texts), group_size)]
    stats = {"distinct_frac": sum(len(set(g)) / len(g) for g in groups) / len(groups)}
    if references and all(r is not None for r in references):
        stats["len_ratio"] = sum(map(len, texts)) / max(1, sum(map(len, references)))
    return stats


def within_budget(reference: Optional[str], tokenizer, max_tokens: int) -> Optional[str]:
    """The reference as a completion of at most max_tokens tokens could have written it: its first max_tokens."""
    if reference is None:
        return None
    return tokenizer.decode(tokenizer.encode(reference).ids[:max_tokens])


def collapse_reasons(stats: dict, prefix: str = "") -> list[str]:
    """Why these stats (keys `prefix + name`) show a collapse, e.g. ["distinct_frac 0.03 < 0.5"]; [] if not."""
    reasons = []
    for name, limit in (("distinct_frac", DISTINCT_MIN), ("len_ratio", LENGTH_MIN)):
        value = stats.get(prefix + name)
        if isinstance(value, (int, float)) and value < limit:
            reasons.append(f"{name} {value:.2f} < {limit}")
    return reasons


def collapsed_tasks(metrics: dict) -> dict[str, list[str]]:
    """The eval tasks whose completions collapsed, from an eval.json stage's flat metrics ("task/stat")."""
    tasks = {key.rsplit("/", 1)[0] for key in metrics if key.rsplit("/", 1)[-1] in STATS}
    reasons = {task: collapse_reasons(metrics, prefix=f"{task}/") for task in sorted(tasks)}
    return {task: r for task, r in reasons.items() if r}
