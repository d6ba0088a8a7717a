"""Reward model, DPO and GRPO: the loss functions against hand-worked values, the parse reward,
then tiny end-to-end runs from a tiny pretrain checkpoint (DPO also killed and resumed on 2 processes)."""

from __future__ import annotations

import json
import math
import random
import subprocess
from pathlib import Path

import pytest
import torch

from tests.conftest import env_for, posttrain_command
from tests.test_distributed import final_weights, killed_at, losses

from training.posttrain.losses import (
    IGNORE,
    bradley_terry_loss,
    dpo_loss,
    frac_reward_zero_std,
    group_advantages,
    grpo_policy_loss,
    k3_kl,
    sequence_logprobs,
    token_logprobs,
)
from training.posttrain.rewards import load_reward_fn, python_parses

# ---------------------------------------------------------------- losses


def test_sequence_logprobs_sums_only_labelled_tokens():
    logits = torch.zeros(1, 3, 4)  # uniform over 4 tokens: log p = -log 4 everywhere
    labels = torch.tensor([[IGNORE, 2, 3]])
    assert sequence_logprobs(logits, labels).item() == pytest.approx(-2 * math.log(4))
    logits[0, 1, 2] = 5.0  # the labelled token at t=1 becomes likelier
    lp = token_logprobs(logits, labels)
    assert lp[0, 0] == 0
    assert lp[0, 1].item() == pytest.approx(5.0 - math.log(math.exp(5) + 3))


def test_dpo_loss_is_log2_at_equal_logprobs_and_margin_sign_follows_the_policy():
    same = torch.tensor([-3.0, -7.0])
    loss, m = dpo_loss(same, same, same, same, beta=0.1)
    assert loss.item() == pytest.approx(math.log(2))
    assert m["rewards/margins"].item() == 0 and m["rewards/accuracies"].item() == 0
    # the policy raised chosen by 2 nats and lowered rejected by 1 vs the reference
    loss, m = dpo_loss(torch.tensor([-1.0]), torch.tensor([-4.0]), torch.tensor([-3.0]), torch.tensor([-3.0]), beta=0.5)
    assert m["rewards/chosen"].item() == pytest.approx(1.0)
    assert m["rewards/rejected"].item() == pytest.approx(-0.5)
    assert m["rewards/margins"].item() == pytest.approx(1.5)
    assert m["rewards/accuracies"].item() == 1.0
    assert loss.item() == pytest.approx(math.log1p(math.exp(-1.5)))
    # the other way round: the loss grows past log 2
    loss, m = dpo_loss(torch.tensor([-4.0]), torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-3.0]), beta=0.5)
    assert m["rewards/margins"].item() < 0 and loss.item() > math.log(2)


def test_dpo_gradient_raises_chosen_and_lowers_rejected():
    chosen, rejected = torch.tensor([-2.0], requires_grad=True), torch.tensor([-2.0], requires_grad=True)
    loss, _ = dpo_loss(chosen, rejected, torch.tensor([-2.0]), torch.tensor([-2.0]), beta=0.1)
    loss.backward()
    assert chosen.grad.item() == pytest.approx(-0.05) and rejected.grad.item() == pytest.approx(0.05)


def test_bradley_terry_loss():
    loss, m = bradley_terry_loss(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 2.0]))
    expected = (math.log(2) + math.log1p(math.exp(2))) / 2
    assert loss.item() == pytest.approx(expected)
    assert m["rewards/accuracies"].item() == 0.0
    assert m["rewards/margins"].item() == pytest.approx(-1.0)


def test_group_advantages_are_zero_mean_unit_std_per_group():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 5.0, 5.0, 5.0, 5.0, 0.0, 1.0, 2.0, 3.0])
    adv = group_advantages(rewards, group_size=4).view(3, 4)
    assert torch.allclose(adv.mean(1), torch.zeros(3), atol=1e-6)
    assert torch.equal(adv[1], torch.zeros(4)), "equal rewards give no advantage"
    assert adv[0, 0].item() == pytest.approx(0.75 / 0.5, rel=1e-3)  # (1 - 0.25) / sample std 0.5
    assert adv[2].std().item() == pytest.approx(1.0, rel=1e-3)
    assert (adv[2].diff() > 0).all()
    with pytest.raises(ValueError):
        group_advantages(rewards, group_size=5)


def test_frac_reward_zero_std():
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.5, 0.5])
    assert frac_reward_zero_std(rewards, 2) == 0.75
    assert frac_reward_zero_std(rewards, 4) == 0.0


def test_k3_kl_is_zero_at_equal_logprobs_and_positive_elsewhere():
    logp = torch.tensor([-1.0, -2.0, -0.5])
    assert torch.equal(k3_kl(logp, logp), torch.zeros(3))
    assert (k3_kl(logp, logp + torch.tensor([0.3, -0.3, 1.0])) > 0).all()
    assert k3_kl(torch.tensor([-1.0]), torch.tensor([-2.0])).item() == pytest.approx(math.exp(-1) + 1 - 1)


def test_grpo_policy_loss_clips_the_ratio_and_masks_padding():
    logp = torch.tensor([[-1.0, -1.0, 0.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0]])
    # ratio 1: loss = -A, and the gradient pushes logp up for A > 0 (averaged over 2 tokens)
    loss, m = grpo_policy_loss(logp, logp.detach(), logp.detach(), torch.tensor([2.0]), mask, kl_coef=0.1)
    assert loss.item() == pytest.approx(-2.0) and m["kl"].item() == 0
    loss.backward()
    assert torch.allclose(logp.grad, torch.tensor([[-1.0, -1.0, 0.0]]))
    # ratio e^0.5 > 1 + eps with A > 0: clipped, so no gradient from the surrogate
    new = torch.tensor([[-0.5, -0.5, 0.0]], requires_grad=True)
    loss, m = grpo_policy_loss(new, logp.detach(), new.detach(), torch.tensor([1.0]), mask, clip_eps=0.2, kl_coef=0)
    assert loss.item() == pytest.approx(-1.2)
    assert m["clip_frac"].item() == 1.0
    loss.backward()
    assert torch.equal(new.grad, torch.zeros(1, 3))


# ---------------------------------------------------------------- the parse reward

SIG = "def area(width, height=1):"


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("def area(width, height=1):\n    return width * height\n", 1.0),
        ("    return width * height\n", 1.0),  # only the body, after a prompt ending in the signature
        ("import math\n\ndef area(width, height=1):\n    '''Doc.'''\n    return math.prod((width, height))\n", 1.0),
        ("def area(width, height=1):\n    return width *\n", 0.0),  # does not parse
        ("def area(width, height=2):\n    return width * height\n", 0.0),  # another default
        ("def area(w, h=1):\n    return w * h\n", 0.0),  # renamed parameters
        ("def volume(width, height=1):\n    return width * height\n", 0.0),  # another name
        ("width * height\n", 0.0),  # parses, but defines nothing
        ("", 0.0),
    ],
)
def test_python_parses(completion, expected):
    assert python_parses(completion, {"prompt": "...", "signature": SIG}) == expected


def test_reward_spec_errors_name_the_key():
    assert load_reward_fn("training.posttrain.rewards:python_parses") is python_parses
    for bad in ("python_parses", "training.posttrain.rewards:nope", "no_such_module:f"):
        with pytest.raises(ValueError, match="grpo.reward"):
            load_reward_fn(bad)


# ---------------------------------------------------------------- data plumbing


def test_example_stream_shards_ranks_apart_and_resumes_exactly():
    from training.posttrain.examples import ExampleStream, eval_batches

    records = list(range(10))
    ranks = [ExampleStream(records, 2, r, 2, seed=3, where="x") for r in range(2)]
    first = [[s.next() for s in ranks] for _ in range(5)]  # 2 global batches of 4 per epoch: 5 spans 3 epochs
    for a, b in first[:2]:
        assert not set(a) & set(b), "the two ranks must see different records"
    resumed = ExampleStream(records, 2, 1, 2, seed=3, where="x")
    probe = ExampleStream(records, 2, 1, 2, seed=3, where="x")
    for _ in range(3):
        probe.next()
    resumed.load_state_dict(json.loads(json.dumps(probe.state_dict())))
    assert [resumed.next(), resumed.next()] == [first[3][1], first[4][1]]
    # held-out records: every rank gets the same number of batches, and each record counts once
    shares = [eval_batches(list(range(7)), 2, r, 2) for r in range(2)]
    assert len(shares[0]) == len(shares[1]) == 2
    counted = [x for share in shares for batch, weights in share for x, w in zip(batch, weights) if w]
    assert sorted(counted) == list(range(7))


# ---------------------------------------------------------------- end to end, from a tiny pretrain


@pytest.fixture(scope="module")
def source(posttrain_source, tmp_path_factory) -> dict:
    """The session's tiny pretrain and demo files; this module's runs go in a folder of its own."""
    return dict(posttrain_source, root=tmp_path_factory.mktemp("alignment"))


def command(kind: str, source: dict, run_dir: Path, *extra: str, nproc: int = 1) -> list[str]:
    return posttrain_command(kind, source, run_dir, *extra, nproc=nproc)


def run(kind: str, source: dict, run_dir: Path, *extra: str, nproc: int = 1) -> str:
    result = subprocess.run(
        command(kind, source, run_dir, *extra, nproc=nproc),
        cwd=source["root"],
        env=env_for(source["root"]),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (run_dir / "summary.json").is_file()
    return result.stdout + result.stderr


def records(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(training records, evaluation records) of metrics.jsonl."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if "loss" in r], [r for r in lines if "loss" not in r]


@pytest.fixture(scope="module")
def rm_run(source) -> Path:
    """A reward model trained for 6 steps (evaluated at 3 and 6); GRPO also uses it as its reward."""
    rm = source["root"] / "rm"
    run("rm", source, rm, "train.max_steps=6", "train.val_every=3", "rm.val_max=16")
    return rm


@pytest.mark.slow
def test_reward_model_trains_its_head_and_saves_it(rm_run):
    train, evals = records(rm_run)
    assert [r["step"] for r in train] == list(range(1, 7))
    assert {"rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected"} <= set(train[-1])
    assert train[0]["loss"] == pytest.approx(math.log(2)), "the head starts at zero: every pair ties"
    assert [r["step"] for r in evals] == [3, 6] and 0 <= evals[-1]["val_accuracy"] <= 1
    weights = final_weights(rm_run)
    assert weights["value_head.weight"].shape == (1, 64) and weights["value_head.weight"].abs().sum() > 0
    # the run records the source's shape (d_model 64), not its job file's model: section
    assert "d_model: 64" in (rm_run / "config.yaml").read_text()


@pytest.mark.slow
def test_dpo_on_two_processes_resumes_bitwise_after_sigkill(source):
    extra = [
        "train.max_steps=12",
        "checkpoint.every=4",
        "checkpoint.keep_last=2",
        "train.micro_batch_size=4",
        "train.val_every=6",
        "dpo.val_max=16",
    ]
    reference, killed = source["root"] / "dpo-reference", source["root"] / "dpo-killed"
    run("dpo", source, reference, *extra, nproc=2)
    train, evals = records(reference)
    assert {"rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected"} <= set(train[-1])
    assert train[0]["loss"] == pytest.approx(math.log(2), abs=1e-3), "the policy starts as its reference"
    assert train[-1]["rewards/margins"] > 0, "training separates chosen from rejected"
    assert [r["step"] for r in evals] == [6, 12] and {"val_accuracy", "val_rewards/margins"} <= set(evals[-1])

    kill_step = random.Random(20261201).randint(5, 10)  # seeded: a failure replays exactly
    killed.parent.mkdir(exist_ok=True)
    assert killed_at(command("dpo", source, killed, *extra, nproc=2), killed, kill_step) != 0
    output = run("dpo", source, killed, *extra, nproc=2)
    resumed_from = ((kill_step - 1) // 4) * 4  # killed before step kill_step counts (and is saved)
    assert f"step_{resumed_from:08d}" in output
    ref, got = losses(reference), losses(killed)
    assert sorted(got) == list(range(1, 13))
    for step in range(resumed_from + 1, 13):
        assert got[step] == ref[step], f"step {step}: {got[step]!r} != {ref[step]!r} (killed at {kill_step})"


@pytest.mark.slow
def test_grpo_takes_its_reward_from_a_reward_model_run(source, rm_run):
    grpo = source["root"] / "grpo-rm"
    run(
        "grpo",
        source,
        grpo,
        "train.max_steps=2",
        "train.micro_batch_size=2",
        "grpo.max_new_tokens=8",
        "grpo.val_prompts=4",
        f"grpo.reward={rm_run}",
    )
    train, evals = records(grpo)
    assert all(r["reward_std"] > 0 and r["frac_reward_zero_std"] == 0 for r in train), "a scalar head's scores differ"
    assert 0 <= evals[0]["val_parses"] <= 1


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("def area(width, height=1):\n    return width * height\n", 1.0),
        ("def area(w):\n    return w\n", 0.75),  # the requested name, other parameters
        ("def volume(width, height=1):\n    return 0\n", 0.5),  # valid Python, another function
        ("width * height\n", 0.0),  # parses, but defines nothing
        ("def area(width, height=1):\n    return (\n", 0.0),
    ],
)
def test_partial_credit_reward(completion, expected):
    from training.posttrain.rewards import defines_function, python_parses_partial

    example = {"prompt": "...", "signature": SIG}
    assert python_parses_partial(completion, example) == expected
    assert defines_function(completion, example) == (expected > 0)
