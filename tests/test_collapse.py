"""Collapse: the numbers (distinct completions, length against the reference's) and the eval report on a
hand-made eval.json where one stage answers every prompt with `return self`: flagged, not celebrated."""

from __future__ import annotations

import json

import pytest

from training.evaluate.report import write_report
from training.posttrain.collapse import collapse_reasons, collapse_stats, collapsed_tasks, within_budget


def test_distinct_per_group_and_length_against_the_references():
    texts = ["a", "a", "b", "c"]  # groups of 2: 1 distinct of 2, then 2 of 2
    stats = collapse_stats(texts, 2, ["xx"] * 4)
    assert stats == {"distinct_frac": pytest.approx(0.75), "len_ratio": pytest.approx(4 / 8)}
    assert "len_ratio" not in collapse_stats(texts, 2, ["xx", None, "xx", "xx"]), "a record without reference"
    assert "len_ratio" not in collapse_stats(texts, 4)
    assert collapse_reasons({"val_distinct_frac": 0.25, "val_len_ratio": 0.9}, "val_") == ["distinct_frac 0.25 < 0.5"]
    assert collapse_reasons({"distinct_frac": 0.9, "len_ratio": 0.1}) == ["len_ratio 0.10 < 0.3"]
    assert collapse_reasons({"distinct_frac": 0.5, "len_ratio": 0.3}) == [], "the limits themselves pass"


def stage(parses: float, distinct: float, len_ratio: float, completion: str) -> dict:
    return {
        "source": "/runs/x",
        "run_dir": None,
        "checkpoint": "/runs/x/checkpoints/step_00000060",
        "metrics": {
            "val/perplexity": 40.0,
            "stdlib_bodies/parses": parses,
            "stdlib_bodies/n": 40,
            "stdlib_bodies/distinct_frac": distinct,
            "stdlib_bodies/len_ratio": len_ratio,
        },
        "samples": {"stdlib_bodies": [{"prompt": "def f(self, x):\n    \"\"\"Do it.\"\"\"", "completion": completion}]},
    }


def test_report_flags_the_collapsed_stage_and_marks_its_parses(tmp_path):
    results = {
        "stages": {
            "sft": stage(0.45, 0.95, 0.8, "\n    y = x + 1\n    return self.g(y)"),
            "grpo": stage(1.0, 1 / 40, 0.04, "\n    return self"),
        }
    }
    assert collapsed_tasks(results["stages"]["grpo"]["metrics"]) == {
        "stdlib_bodies": ["distinct_frac 0.03 < 0.5", "len_ratio 0.04 < 0.3"]
    }
    assert collapsed_tasks(results["stages"]["sft"]["metrics"]) == {}
    (tmp_path / "eval.json").write_text(json.dumps(results))
    report = write_report(tmp_path, results).read_text()
    assert "**Warning: grpo's completions on stdlib_bodies have collapsed** (distinct_frac 0.03 < 0.5" in report
    assert "Warning: sft" not in report
    assert "| grpo | stdlib_bodies | 0.025 | 0.04 | **collapsed** |" in report
    assert "| sft | stdlib_bodies | 0.95 | 0.8 | ok |" in report
    # the table shows grpo's perfect parses as hollow, and sft's as they are
    assert "| stdlib_bodies/parses | 0.45 | 1 (collapsed) |" in report
    assert "### grpo: a stdlib_bodies sample (collapsed)" in report and "### sft: a stdlib_bodies sample\n" in report
    assert report.index("Warning: grpo") < report.index("## Metrics"), "the warning comes before the numbers"


def test_a_report_without_the_numbers_flags_nothing(tmp_path):
    """An eval.json from before (no distinct_frac, no len_ratio): no collapse section, nothing marked."""
    old = stage(1.0, 0.0, 0.0, "\n    return self")
    for key in ("stdlib_bodies/distinct_frac", "stdlib_bodies/len_ratio"):
        del old["metrics"][key]
    report = write_report(tmp_path, {"stages": {"grpo": old}}).read_text()
    assert "collapse" not in report.lower()


def test_within_budget_keeps_the_references_first_tokens():
    """len_ratio's reference is as long as a completion may be: its first max_tokens tokens (a real BPE)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    body = "    return sum(values) / len(values)\n" * 20
    tokenizer.train_from_iterator(
        [body],
        trainers.BpeTrainer(vocab_size=300, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()),
    )
    ids = tokenizer.encode(body).ids
    assert len(ids) > 10
    assert within_budget(body, tokenizer, 10) == tokenizer.decode(ids[:10])
    assert body.startswith(within_budget(body, tokenizer, 10)) and len(within_budget(body, tokenizer, 10)) < len(body)
    assert within_budget(body, tokenizer, 10_000) == body
    assert within_budget(None, tokenizer, 10) is None, "a record without a reference has none"
