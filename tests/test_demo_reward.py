"""The demo's GRPO reward scores behaviour, not the prompt copied back: on every held-out demo record, a
`return None` body, a copied docstring and a truncated completion score below the correct body and below a
plausible wrong one (another held-out function's body of about the same length); the tests of a record run in
the eval's sandbox; the schema's defaults are the demo's; a run whose completions collapse stops."""

from __future__ import annotations

import ast
import json
import subprocess
import textwrap

import pytest

from jobspec.loading import load_spec
from tests.conftest import REPO, env_for, posttrain_command
from training.posttrain.rewards import TRIVIAL_BODIES, demo_body_reward, parses_and_resembles, share_of_tests_passed


@pytest.fixture(scope="module")
def heldout(request) -> list[dict]:
    """The demo's held-out GRPO records (the json and email packages), derived as the demo derives them (kept in
    pytest's cache folder: write_demo_data derives them again when its inputs change)."""
    from training.posttrain.demo_data import write_demo_data

    paths = write_demo_data(request.config.cache.mkdir("demo-posttrain"))
    return [json.loads(line) for line in paths["grpo_val"].read_text().splitlines()]


def split(record: dict) -> tuple[str, list[str]]:
    """(the def line and docstring, the body's lines) of a record's reference."""
    lines = record["reference"].split("\n")
    function = ast.parse(record["reference"]).body[0]
    code = function.body[1].lineno - 1  # the first statement after the docstring
    return "\n".join(lines[:code]), lines[code:]


def candidates(records: list[dict], parts: list[tuple[str, list[str]]], i: int) -> dict[str, tuple[str, bool]]:
    """Completions for record i (parts: each record's split), each with whether it ran out of tokens."""
    head, body = parts[i]
    size = len("\n".join(body))
    others = [j for j in range(len(records)) if j != i]
    nearest = min(others, key=lambda j: abs(len("\n".join(parts[j][1])) - size))
    docstring = head.split("\n", 1)[1]
    return {
        "correct": (records[i]["reference"], False),
        "wrong": (head + "\n" + "\n".join(parts[nearest][1]), False),
        "return None": (head + "\n    return None", False),
        "copied docstring": (head + "\n" + docstring, False),
        # cut after a whole line (it still parses), and cut mid-line: both ran out of tokens
        "truncated": (head + "\n" + "\n".join(body[: max(1, len(body) // 2)]), True),
        "truncated mid-line": (records[i]["reference"][: len(head) + size // 2], True),
    }


def test_gamed_completions_score_below_correct_and_wrong_bodies(heldout):
    assert len(heldout) >= 100
    parts = [split(r) for r in heldout]
    scores, old_none_beats_wrong, compared, old_compared = [], 0, 0, 0
    for i, record in enumerate(heldout):
        texts = candidates(heldout, parts, i)
        got = {name: demo_body_reward(text, dict(record, truncated=cut)) for name, (text, cut) in texts.items()}
        scores.append(got)
        body = ast.unparse(ast.parse(textwrap.dedent("\n".join(parts[i][1]))))
        if body in TRIVIAL_BODIES or texts["wrong"][0] == record["reference"]:
            continue  # the reference body is itself `return None` (or the same as another function's)
        compared += 1
        assert got["correct"] == pytest.approx(1.0)
        for gamed in ("return None", "copied docstring", "truncated", "truncated mid-line"):
            assert got[gamed] < got["wrong"] < got["correct"], (record["reference"], got)
        if i % 4 == 0:  # the reward it replaces (slow: difflib over whole functions), on a quarter of them
            old = {name: parses_and_resembles(texts[name][0], record) for name in ("return None", "wrong")}
            old_none_beats_wrong += old["return None"] >= old["wrong"]
            old_compared += 1
    assert compared >= len(heldout) - 3
    mean = {name: sum(s[name] for s in scores) / len(scores) for name in scores[0]}
    assert mean["return None"] < 0.05 and mean["copied docstring"] == 0 and mean["truncated"] == 0
    assert mean["wrong"] > 0.2
    # the reward it replaces, on the same records: `return None` beat the wrong body on most of them
    assert old_none_beats_wrong > old_compared / 2


def test_tests_run_in_the_sandbox_and_count_as_the_share_passed():
    records = [json.loads(line) for line in (REPO / "jobs/tasks/data/python_functions.jsonl").read_text().splitlines()]
    add = next(r for r in records if r["name"] == "add")
    record = {"signature": "def add(a, b):", "test": add["test"], "reference": add["prompt"] + add["reference"]}
    right, wrong = add["prompt"] + "\n    return a + b", add["prompt"] + "\n    return a - b"
    assert share_of_tests_passed(right, record) == 1.0 and share_of_tests_passed(wrong, record) == 0.0
    two = dict(record, test=None, tests=["assert add(2, 2) == 4", "assert add(2, 3) == 5"])
    assert share_of_tests_passed(add["prompt"] + "\n    return 2 * a", two) == 0.5, "right for a == b only"
    assert share_of_tests_passed(right, {"signature": "def add(a, b):"}) is None, "no tests: nothing to run"
    # the tests decide between bodies that resemble the reference equally
    assert demo_body_reward(right, record) == pytest.approx(1.0)
    assert demo_body_reward(wrong, record) == pytest.approx(0.5 * demo_body_reward(wrong, dict(record, test=None)))
    # the test runs confined: a body that reads our files passes nothing
    snoop = add["prompt"] + f"\n    return len(open({str(REPO / 'README.md')!r}).read()) and a + b"
    assert share_of_tests_passed(snoop, record) == 0.0


def test_the_schemas_grpo_defaults_are_the_demos():
    demo = load_spec(str(REPO / "jobs" / "grpo.yaml"))
    bare = load_spec(str(REPO / "jobs" / "grpo.yaml"), ["grpo.reward=training.posttrain.rewards:demo_body_reward"])
    from jobspec.schema import GRPOConfig

    assert GRPOConfig().reward == demo.grpo.reward == bare.grpo.reward == "training.posttrain.rewards:demo_body_reward"
    assert GRPOConfig().max_new_tokens == demo.grpo.max_new_tokens == 160


@pytest.mark.slow
def test_a_run_whose_completions_collapse_stops(posttrain_source, tmp_path):
    """Sampled almost greedily, every group is one answer repeated: the run stops at its first log with exit 2
    and says why, and writes no checkpoint after the collapse."""
    run_dir = tmp_path / "collapse"
    result = subprocess.run(
        posttrain_command(
            "grpo",
            posttrain_source,
            run_dir,
            "train.max_steps=3",
            "train.micro_batch_size=2",
            "grpo.max_new_tokens=16",
            "grpo.temperature=0.001",
            "grpo.val_prompts=2",
            "train.val_at_start=false",
            "grpo.reward=tests.test_grpo:letter_share",
        ),
        cwd=tmp_path,
        env=env_for(tmp_path),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "GRPO stopped: its completions collapsed (distinct_frac" in result.stdout + result.stderr
    assert not (run_dir / "summary.json").exists()
    assert not list((run_dir / "checkpoints").glob("step_*")) if (run_dir / "checkpoints").exists() else True
