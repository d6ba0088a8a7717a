"""GRPO's pieces as pure functions, against values worked out by hand: the three loss aggregations
(grpo, dr_grpo, dapo), asymmetric clipping, the three reward scalings, and log-probabilities taken
from the distribution that sampled (temperature and top-k)."""

from __future__ import annotations

import math

import pytest
import torch

from model.generate import sample_next
from training.posttrain.losses import (
    IGNORE,
    LOGPROB_FLOOR,
    group_advantages,
    grpo_policy_loss,
    sampled_logprobs,
    token_logprobs,
)

# Two completions: one token with advantage +1, three tokens with advantage -1 (the rest is padding).
MASK = torch.tensor([[1, 0, 0], [1, 1, 1]])
ADV = torch.tensor([1.0, -1.0])


def loss_and_grad(loss_type: str, **kw) -> tuple[float, torch.Tensor]:
    logp = torch.full((2, 3), -1.0, requires_grad=True)
    loss, _ = grpo_policy_loss(logp, logp.detach(), logp.detach(), ADV, MASK, kl_coef=0.0, loss_type=loss_type, **kw)
    loss.backward()
    return loss.item(), logp.grad


def test_grpo_averages_each_completion_then_the_completions():
    # per-token losses -A: [-1] and [1, 1, 1]; means -1 and 1; their mean 0
    loss, grad = loss_and_grad("grpo")
    assert loss == pytest.approx(0.0)
    # d/dlogp of -ratio*A / len / 2: -1/2 for the lone token, +1/6 for each of the three
    assert torch.allclose(grad, torch.tensor([[-0.5, 0, 0], [1 / 6, 1 / 6, 1 / 6]]))


def test_dapo_weighs_every_token_alike():
    loss, grad = loss_and_grad("dapo")
    assert loss == pytest.approx((-1 + 3) / 4)
    assert torch.allclose(grad, torch.tensor([[-0.25, 0, 0], [0.25, 0.25, 0.25]]))


def test_dr_grpo_divides_by_a_constant():
    loss, grad = loss_and_grad("dr_grpo", max_completion_length=4)
    assert loss == pytest.approx((-1 + 3) / (2 * 4))
    assert torch.allclose(grad, torch.tensor([[-0.125, 0, 0], [0.125, 0.125, 0.125]]))
    with pytest.raises(ValueError, match="max_completion_length"):
        loss_and_grad("dr_grpo")
    with pytest.raises(ValueError, match="grpo.loss_type"):
        loss_and_grad("ppo")


def test_epsilon_high_widens_the_upper_clip_only():
    old = torch.tensor([[0.0]])
    new = torch.tensor([[math.log(1.25)]], requires_grad=True)
    one = torch.tensor([[1]])
    # A > 0, ratio 1.25: clipped at 1 + 0.2 (loss -1.2, no gradient), but not at 1 + 0.28
    loss, m = grpo_policy_loss(new, old, new.detach(), torch.tensor([1.0]), one, clip_eps=0.2, kl_coef=0)
    assert loss.item() == pytest.approx(-1.2) and m["clip_frac"].item() == 1.0
    loss, m = grpo_policy_loss(
        new, old, new.detach(), torch.tensor([1.0]), one, clip_eps=0.2, kl_coef=0, clip_eps_high=0.28
    )
    assert loss.item() == pytest.approx(-1.25) and m["clip_frac"].item() == 0.0
    loss.backward()
    assert new.grad.item() == pytest.approx(-1.25)  # d(-ratio)/dlogp = -ratio
    # A < 0, ratio 0.75: below 1 - 0.2, clipped whatever epsilon_high is
    low = torch.tensor([[math.log(0.75)]])
    loss, m = grpo_policy_loss(low, old, low, torch.tensor([-1.0]), one, clip_eps=0.2, kl_coef=0, clip_eps_high=0.28)
    assert loss.item() == pytest.approx(0.8) and m["clip_frac"].item() == 1.0
    # A > 0 with ratio 0.75: the unclipped term is the smaller, no clip is active
    _, m = grpo_policy_loss(low, old, low, torch.tensor([1.0]), one, clip_eps=0.2, kl_coef=0)
    assert m["clip_frac"].item() == 0.0


def test_kl_term_enters_every_aggregation():
    logp = torch.tensor([[-1.0, -1.0]])
    ref = torch.tensor([[-2.0, -2.0]])  # k3 = e^-1 + 1 - 1 = e^-1 per token
    mask = torch.tensor([[1, 1]])
    for loss_type, kw in (("grpo", {}), ("dapo", {}), ("dr_grpo", {"max_completion_length": 2})):
        loss, m = grpo_policy_loss(logp, logp, ref, torch.tensor([0.0]), mask, kl_coef=0.5, loss_type=loss_type, **kw)
        assert loss.item() == pytest.approx(0.5 * math.exp(-1)), loss_type
        assert m["kl"].item() == pytest.approx(math.exp(-1))


def test_scale_rewards_group_batch_none():
    rewards = torch.tensor([0.0, 1.0, 0.0, 3.0])  # two groups of 2: centred [-0.5, 0.5, -1.5, 1.5]
    s = 1 / math.sqrt(2)  # each group's sample std is its spread / sqrt(2): 0.707 and 2.121
    assert torch.allclose(group_advantages(rewards, 2, "group"), torch.tensor([-s, s, -s, s]), atol=1e-3)
    # one std over the batch: deviations from 1 are [-1, 0, -1, 2], sample variance 6/3 = 2
    b = math.sqrt(2)
    assert torch.allclose(group_advantages(rewards, 2, "batch"), torch.tensor([-0.5, 0.5, -1.5, 1.5]) / b, atol=1e-3)
    assert torch.equal(group_advantages(rewards, 2, "none"), torch.tensor([-0.5, 0.5, -1.5, 1.5]))
    assert torch.equal(group_advantages(torch.tensor([2.0, 2.0, 0.0, 1.0]), 2, "batch")[:2], torch.zeros(2))
    with pytest.raises(ValueError, match="scale_rewards"):
        group_advantages(rewards, 2, "max")


def test_sampled_logprobs_apply_temperature_and_top_k():
    logits = torch.tensor([[[1.0, 2.0, 3.0, 0.0]]])
    # temperature 0.5 doubles the logits [2, 4, 6, 0]; top_k=2 keeps 4 and 6
    got = sampled_logprobs(logits, torch.tensor([[2]]), temperature=0.5, top_k=2)
    assert got.item() == pytest.approx(6 - math.log(math.exp(4) + math.exp(6)))
    outside = sampled_logprobs(logits, torch.tensor([[0]]), temperature=0.5, top_k=2)
    assert outside.item() == LOGPROB_FLOOR, "a token the top-k excludes is floored, not -inf"
    assert sampled_logprobs(logits, torch.tensor([[IGNORE]]), 0.5, 2).item() == 0.0
    # with temperature 1 and no top-k they are the plain log-probs
    assert torch.equal(sampled_logprobs(logits, torch.tensor([[1]])), token_logprobs(logits, torch.tensor([[1]])))


def test_sampled_logprobs_are_the_frequencies_the_sampler_produces():
    """What generate() draws at temperature 0.7 and top_k 3 has exactly these probabilities; the plain
    log_softmax of the raw logits is measurably another distribution."""
    torch.manual_seed(0)
    logits = torch.randn(1, 8) * 2
    draws = sample_next(logits.expand(40_000, 8), temperature=0.7, top_k=3, generator=torch.Generator().manual_seed(1))
    freq = torch.bincount(draws, minlength=8).double() / draws.numel()
    labels = torch.arange(8).view(1, 8)
    ours = sampled_logprobs(logits.view(1, 1, 8).expand(1, 8, 8), labels, 0.7, 3).exp().view(8).double()
    ours[ours < 1e-8] = 0.0  # the floor stands for probability 0
    assert torch.allclose(freq, ours, atol=0.01)
    plain = token_logprobs(logits.view(1, 1, 8).expand(1, 8, 8), labels).exp().view(8).double()
    assert (freq - plain).abs().max() > 0.05, "the untempered distribution is not the one that sampled"
