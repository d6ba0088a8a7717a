"""The post-training objectives as pure functions of tensors: no model, no data, no state.

    token_logprobs / sequence_logprobs   log p(completion | prompt) from logits and -100-masked labels
    dpo_loss                             Direct Preference Optimization (Rafailov et al. 2023), sigmoid form
    bradley_terry_loss                   the reward model's pairwise loss
    group_advantages                     GRPO (Shao et al. 2024): rewards normalized within each prompt's group
    grpo_policy_loss                     clipped-ratio policy loss plus a k3 KL penalty to the reference
    frac_reward_zero_std                 share of groups whose rewards are all equal (they give no gradient)

Each is unit-tested in tests/test_alignment.py with values worked out by hand.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100  # the label of a token that carries no loss (prompt tokens, padding)


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(label_t) under logits_t, [batch, seq]; 0 where the label is IGNORE.

    logits [batch, seq, vocab] and labels [batch, seq] are aligned: labels[:, t] is the token
    that logits[:, t] predicts (the caller has already shifted them)."""
    mask = labels != IGNORE
    safe = labels.masked_fill(~mask, 0)
    logp = torch.gather(logits.float().log_softmax(-1), -1, safe.unsqueeze(-1)).squeeze(-1)
    return logp * mask


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(completion | prompt) per sequence [batch]: the sum over the labelled tokens."""
    return token_logprobs(logits, labels).sum(-1)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """-log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))), averaged over pairs.

    The inputs are sequence log-probs [batch]. The implicit rewards beta * (pi - ref) are returned
    detached as metrics: rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies
    (the share of pairs whose chosen answer gets the higher implicit reward)."""
    chosen = beta * (policy_chosen - ref_chosen)
    rejected = beta * (policy_rejected - ref_rejected)
    loss = -F.logsigmoid(chosen - rejected).mean()
    chosen, rejected = chosen.detach(), rejected.detach()
    metrics = {"rewards/chosen": chosen.mean(), "rewards/rejected": rejected.mean(),
               "rewards/margins": (chosen - rejected).mean(), "rewards/accuracies": (chosen > rejected).float().mean()}
    return loss, metrics


def bradley_terry_loss(reward_chosen: torch.Tensor, reward_rejected: torch.Tensor
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """-log sigmoid(r_chosen - r_rejected): P(chosen preferred) under the Bradley-Terry model."""
    loss = -F.logsigmoid(reward_chosen - reward_rejected).mean()
    c, r = reward_chosen.detach(), reward_rejected.detach()
    return loss, {"rewards/chosen": c.mean(), "rewards/rejected": r.mean(), "rewards/margins": (c - r).mean(),
                  "rewards/accuracies": (c > r).float().mean()}


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """(r - mean) / (std + eps) within each group of `group_size` consecutive completions of one prompt.

    rewards [n_prompts * group_size] -> advantages of the same shape. std is the sample standard
    deviation (as in DeepSeekMath and TRL); a group whose rewards are all equal gets advantages 0."""
    if group_size < 2 or rewards.numel() % group_size:
        raise ValueError(f"group_advantages: {rewards.numel()} rewards can't form groups of {group_size} (>= 2)")
    groups = rewards.float().view(-1, group_size)
    adv = (groups - groups.mean(1, keepdim=True)) / (groups.std(1, keepdim=True) + eps)
    return adv.view(-1)


def frac_reward_zero_std(rewards: torch.Tensor, group_size: int) -> float:
    """The share of groups whose rewards are all the same: their advantages are 0, so they teach nothing."""
    groups = rewards.view(-1, group_size)
    return (groups.max(1).values == groups.min(1).values).float().mean().item()


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token KL(policy || reference) estimate exp(ref - logp) - (ref - logp) - 1 (Schulman's k3):
    unbiased for tokens sampled from the policy, and never negative."""
    diff = ref_logp - logp
    return torch.exp(diff) - diff - 1


def grpo_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor, advantages: torch.Tensor,
                     mask: torch.Tensor, clip_eps: float = 0.2, kl_coef: float = 0.04
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO's objective, to minimize: -min(ratio * A, clip(ratio, 1 +- eps) * A) + kl_coef * k3_kl per token,
    averaged over each completion's tokens, then over completions.

    logp, old_logp, ref_logp, mask: [batch, seq] per completion token (mask 1 on completion tokens);
    advantages: [batch], one per completion. old_logp are the log-probs the completions were sampled
    with: with one update per batch they equal logp.detach() and the ratio is 1 (its gradient is not)."""
    mask = mask.float()
    ratio = torch.exp(logp - old_logp)
    adv = advantages.unsqueeze(1)
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
    kl = k3_kl(logp, ref_logp)
    per_token = -surrogate + kl_coef * kl
    lengths = mask.sum(1).clamp(min=1)
    loss = ((per_token * mask).sum(1) / lengths).mean()
    clipped = ((ratio - 1).abs() > clip_eps).float()
    metrics = {"kl": ((kl.detach() * mask).sum(1) / lengths).mean(),
               "clip_frac": ((clipped * mask).sum() / mask.sum().clamp(min=1))}
    return loss, metrics
