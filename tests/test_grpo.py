"""GRPO end to end, from the session's tiny pretrain: groups sampled and learned from, several updates per
sampled batch (the clip acts; a single process killed between two updates of one batch resumes exactly), LoRA
(the KL reference is the base with adapters off), and the warning when completions collapse (with
grpo.stop_on_collapse=false).
(The loss functions themselves: tests/test_grpo_losses.py; GRPO with a reward model: tests/test_alignment.py.)"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from tests.conftest import env_for, posttrain_command
from tests.test_distributed import final_weights, killed_at, losses

# Small and quick: 2 prompts x 4 completions of <= 16 tokens per step, 4 held-out prompts.
SMALL = [
    "train.micro_batch_size=2",
    "grpo.max_new_tokens=16",
    "grpo.val_prompts=4",
    "grpo.reward=tests.test_grpo:letter_share",
]


def letter_share(completion: str, example: dict) -> float:
    """A reward for the tests: varied even for a barely trained model, so GRPO has something to learn."""
    return sum(c.isalpha() for c in completion) / max(1, len(completion))


@pytest.fixture(scope="module")
def source(posttrain_source, tmp_path_factory) -> dict:
    return dict(posttrain_source, root=tmp_path_factory.mktemp("grpo"))


def run(source: dict, run_dir: Path, *extra: str) -> str:
    result = subprocess.run(
        posttrain_command("grpo", source, run_dir, *SMALL, *extra),
        cwd=source["root"],
        env=env_for(source["root"]),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def records(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(training records, evaluation records) of metrics.jsonl."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if "loss" in r], [r for r in lines if "loss" not in r]


@pytest.mark.slow
def test_grpo_samples_groups_and_learns_from_their_spread(source):
    grpo = source["root"] / "grpo"
    run(source, grpo, "train.max_steps=4", "grpo.num_iterations=1")
    train, evals = records(grpo)
    keys = {"reward_mean", "reward_std", "kl", "completion_len", "frac_reward_zero_std", "clip_frac", "distinct_frac"}
    assert [r["step"] for r in train] == [1, 2, 3, 4] and all(keys <= set(r) for r in train)
    assert all(0 < r["completion_len"] <= 16 and r["reward_std"] > 0 for r in train)
    assert all(r["grad_norm"] > 0 for r in train), "rewards that differ within a group give a gradient"
    assert train[0]["kl"] == 0 and train[-1]["kl"] > 0, "the policy leaves its reference"
    assert all(r["clip_frac"] == 0 for r in train), "one update per sampled batch: the ratio is 1, never clipped"
    assert [r["step"] for r in evals] == [0, 4]  # jobs/grpo.yaml: val_at_start, then at the end
    assert all(
        {"val_parses", "val_signature", "val_reward", "val_completion_len", "val_distinct_frac"} <= set(r)
        for r in evals
    )


@pytest.mark.slow
def test_two_updates_per_batch_clip_and_a_kill_between_them_resumes_exactly(source):
    """num_iterations=2: steps 1 and 2 update on one sampled batch, 3 and 4 on the next. The second update's
    ratio has left 1, so the clip acts (clip_frac > 0); the first's is exactly 1. Killed after step 2's
    optimizer step, the run resumes from step 1's checkpoint, between the two updates of the first batch:
    the kept batch (tokens, rewards, sampling log-probs) makes step 2 again exactly, and the rest follows."""
    extra = [
        "train.max_steps=4",
        "grpo.num_iterations=2",
        "checkpoint.every=1",
        "checkpoint.keep_last=4",
        "optim.lr=3e-2",
        "optim.warmup_steps=0",
        "train.val_at_start=false",
    ]
    reference, killed = source["root"] / "iter-reference", source["root"] / "iter-killed"
    run(source, reference, *extra)
    train, _ = records(reference)
    assert [r["clip_frac"] for r in train[0::2]] == [0, 0], "a batch's first update: ratio 1"
    assert all(r["clip_frac"] > 0 for r in train[1::2]), "its second update: the policy moved, the clip acts"
    assert train[0]["reward_mean"] == train[1]["reward_mean"] != train[2]["reward_mean"], "resampled every 2 steps"

    killed.mkdir()
    command = posttrain_command("grpo", source, killed, *SMALL, *extra)
    assert killed_at(command, killed, 2, rank=0) != 0
    output = run(source, killed, *extra)
    assert "step_00000001" in output, "resumed between the two updates of the first batch"
    assert "sampled afresh" not in output
    ref, got = losses(reference), losses(killed)
    for step in (2, 3, 4):
        assert got[step] == ref[step], f"step {step}: {got[step]!r} != {ref[step]!r}"
    a, b = final_weights(reference), final_weights(killed)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_grpo_with_lora_takes_the_base_as_its_kl_reference(source):
    """With LoRA no second model is built: the reference is the policy with its adapters off, so the KL is 0
    while the adapters are 0 (step 1), and grows once they have learned."""
    run_dir = source["root"] / "lora"
    output = run(
        source,
        run_dir,
        "train.max_steps=3",
        "grpo.num_iterations=1",
        "lora.enabled=true",
        "lora.rank=4",
        "lora.alpha=8",
        "lora.target_modules=[wq,wv,w1,w2,w3]",
        "optim.lr=1e-2",
        "optim.warmup_steps=0",
        "train.val_at_start=false",
    )
    assert "LoRA:" in output and "parameters train" in output
    train, _ = records(run_dir)
    assert train[0]["kl"] == 0, "adapters start at zero: the policy is its reference"
    assert train[-1]["kl"] > 0, "the reference stays the base while the adapters learn"
    saved = final_weights(run_dir)
    assert saved and all(".lora_A." in k or ".lora_B." in k for k in saved), "the checkpoint holds the adapters only"


@pytest.mark.slow
def test_collapsing_completions_are_warned_about_in_the_logs(source):
    """Sampled almost greedily, a group's completions are one answer repeated: distinct_frac falls to about
    1/group_size and the log says so, beside reward_mean."""
    run_dir = source["root"] / "collapse"
    output = run(
        source,
        run_dir,
        "train.max_steps=1",
        "grpo.temperature=0.001",
        "grpo.val_prompts=2",
        "train.val_at_start=false",
        "grpo.stop_on_collapse=false",  # warned, not stopped (the stop: tests/test_demo_reward.py)
    )
    train, _ = records(run_dir)
    assert train[0]["distinct_frac"] < 0.5
    assert f"warning: GRPO completions are collapsing (distinct_frac {train[0]['distinct_frac']:.2f} < 0.5" in output
