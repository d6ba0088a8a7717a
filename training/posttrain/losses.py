"""The post-training objectives as pure functions of tensors: no model, no data, no state.

    token_logprobs / sequence_logprobs   log p(completion | prompt) from logits and -100-masked labels
    sampled_logprobs                     the same under the distribution that sampled (temperature, top-k)
    dpo_loss                             Direct Preference Optimization (Rafailov et al. 2023): TRL's sigmoid,
                                         robust, hinge and ipo forms, label smoothing
    bradley_terry_loss                   the reward model's pairwise loss
    group_advantages                     GRPO (Shao et al. 2024): rewards centred per prompt's group, scaled
    grpo_policy_loss                     clipped-ratio policy loss plus a k3 KL penalty to the reference,
                                         aggregated as GRPO, Dr. GRPO or DAPO do
    frac_reward_zero_std                 share of groups whose rewards are all equal (they give no gradient)

Each is unit-tested in tests/test_alignment.py with values worked out by hand.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from jobspec.schema import DPO_LOSS_TYPES
from jobspec.schema import GRPO_LOSS_TYPES as LOSS_TYPES
from jobspec.schema import GRPO_SCALE_REWARDS as SCALE_REWARDS

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


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    *,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The DPO loss of pairs, averaged; with h = (pi_c - ref_c) - (pi_r - ref_r) and e = label_smoothing
    (TRL's formulas, trl/trainer/dpo_trainer.py):

        sigmoid  -(1 - e) log sigmoid(beta h) - e log sigmoid(-beta h)    DPO; e > 0: conservative DPO
        robust   (-(1 - e) log sigmoid(beta h) + e log sigmoid(-beta h)) / (1 - 2e)   robust DPO (Chowdhury 2024)
        hinge    max(0, 1 - beta h)                                     RSO (Liu et al. 2023)
        ipo      (h - 1 / (2 beta))^2                                   IPO (Azar et al. 2023): the caller passes
                                                                        per-token mean log-probs, as TRL does

    The inputs are sequence log-probs [batch] (reference_free: the reference's are 0). The implicit rewards
    beta * (pi - ref) are returned detached as metrics: rewards/chosen, rewards/rejected, rewards/margins,
    rewards/accuracies (the share of pairs whose chosen answer gets the higher implicit reward)."""
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"dpo.loss_type={loss_type!r} must be one of {', '.join(DPO_LOSS_TYPES)}")
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"dpo.label_smoothing={label_smoothing} must be in [0, 0.5)")
    chosen = beta * (policy_chosen - ref_chosen)
    rejected = beta * (policy_rejected - ref_rejected)
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    e = label_smoothing
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * h) * (1 - e) - F.logsigmoid(-beta * h) * e
    elif loss_type == "robust":
        losses = (-F.logsigmoid(beta * h) * (1 - e) + F.logsigmoid(-beta * h) * e) / (1 - 2 * e)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    else:
        losses = (h - 1 / (2 * beta)) ** 2
    loss = losses.mean()
    chosen, rejected = chosen.detach(), rejected.detach()
    metrics = {
        "rewards/chosen": chosen.mean(),
        "rewards/rejected": rejected.mean(),
        "rewards/margins": (chosen - rejected).mean(),
        "rewards/accuracies": (chosen > rejected).float().mean(),
    }
    return loss, metrics


def chosen_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """RPO's NLL term (Pang et al. 2024; TRL's rpo_alpha): the mean negative log-likelihood over the labelled
    tokens of the chosen answers (logits, labels: the chosen rows), as one cross-entropy over those tokens."""
    mask = labels != IGNORE
    return -(token_logprobs(logits, labels).sum() / mask.sum().clamp(min=1))


def bradley_terry_loss(
    reward_chosen: torch.Tensor, reward_rejected: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """-log sigmoid(r_chosen - r_rejected): P(chosen preferred) under the Bradley-Terry model."""
    loss = -F.logsigmoid(reward_chosen - reward_rejected).mean()
    c, r = reward_chosen.detach(), reward_rejected.detach()
    return loss, {
        "rewards/chosen": c.mean(),
        "rewards/rejected": r.mean(),
        "rewards/margins": (c - r).mean(),
        "rewards/accuracies": (c > r).float().mean(),
    }


# A sampled token that the policy's top-k no longer admits has probability 0; its log-prob is floored
# here so that the ratio and the KL stay finite (the clip then zeroes its gradient anyway).
LOGPROB_FLOOR = -20.0


def sampled_logprobs(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0, top_k: Optional[int] = None
) -> torch.Tensor:
    """token_logprobs under the distribution generate() samples from at this temperature and top_k
    (model/generate.py's sampling_logits), floored at LOGPROB_FLOOR; 0 where the label is IGNORE.

    GRPO's ratio pi/pi_old and its KL to the reference are about the policy that produced the
    completions: with temperature != 1 or a top_k, the plain log_softmax is another distribution."""
    from model.generate import sampling_logits

    mask = labels != IGNORE
    logits = sampling_logits(logits, temperature, top_k)
    logp = torch.gather(logits.log_softmax(-1), -1, labels.masked_fill(~mask, 0).unsqueeze(-1)).squeeze(-1)
    return torch.where(mask, logp.clamp(min=LOGPROB_FLOOR), torch.zeros_like(logp))


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4) -> torch.Tensor:
    """Rewards minus their group's mean, divided by a standard deviation (TRL's scale_rewards):

        group  (r - mean_g) / (std_g + eps)   DeepSeekMath's GRPO; TRL's default
        batch  (r - mean_g) / (std_all + eps) one scale for the whole batch (PPO Lite)
        none   r - mean_g                     Dr. GRPO: a group's spread no longer weighs its prompt

    rewards [n_prompts * group_size], each group's completions consecutive -> advantages, same shape.
    std is the sample standard deviation (as in DeepSeekMath and TRL); a group whose rewards are all
    equal gets advantages 0 under every scale."""
    if group_size < 2 or rewards.numel() % group_size:
        raise ValueError(f"group_advantages: {rewards.numel()} rewards can't form groups of {group_size} (>= 2)")
    if scale not in SCALE_REWARDS:
        raise ValueError(f"grpo.scale_rewards={scale!r} must be one of {', '.join(SCALE_REWARDS)}")
    groups = rewards.float().view(-1, group_size)
    centred = groups - groups.mean(1, keepdim=True)
    if scale == "group":
        centred = centred / (groups.std(1, keepdim=True) + eps)
    elif scale == "batch":
        centred = centred / (groups.std() + eps)
    return centred.view(-1)


def frac_reward_zero_std(rewards: torch.Tensor, group_size: int) -> float:
    """The share of groups whose rewards are all the same: their advantages are 0, so they teach nothing."""
    groups = rewards.view(-1, group_size)
    return (groups.max(1).values == groups.min(1).values).float().mean().item()


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token KL(policy || reference) estimate exp(ref - logp) - (ref - logp) - 1 (Schulman's k3):
    unbiased for tokens sampled from the policy, and never negative."""
    diff = ref_logp - logp
    return torch.exp(diff) - diff - 1


def grpo_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
    kl_coef: float = 0.04,
    *,
    clip_eps_high: Optional[float] = None,
    loss_type: str = "grpo",
    max_completion_length: Optional[int] = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO's objective, to minimize. Per token t of completion i:

        l_it = -min(ratio_it * A_i, clip(ratio_it, 1 - eps, 1 + eps_high) * A_i) + kl_coef * k3_kl_it
        ratio_it = exp(logp_it - old_logp_it)       (old: the log-probs the completion was sampled with)

    then aggregated over the mask's tokens as loss_type says (TRL's names):

        grpo     mean over each completion's tokens, then over completions (DeepSeekMath). Biased by length:
                 a long wrong answer is penalized less per token than a short one.
        dr_grpo  sum over all tokens / (completions * max_completion_length) (Dr. GRPO, Liu et al. 2025)
        dapo     sum over all tokens / tokens (DAPO, Yu et al. 2025): every token weighs the same

    logp, old_logp, ref_logp, mask: [batch, seq] per completion token (mask 1 on tokens that count);
    advantages [batch]. With one update per sampled batch, old_logp = logp.detach(): the ratio is 1 in
    value, not in gradient. clip_frac is the share of tokens whose clip is active (its gradient cut):
    ratio < 1 - eps with A < 0, or ratio > 1 + eps_high with A > 0, as TRL counts it."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"grpo.loss_type={loss_type!r} must be one of {', '.join(LOSS_TYPES)}")
    if loss_type == "dr_grpo" and not max_completion_length:
        raise ValueError("grpo_policy_loss: loss_type 'dr_grpo' needs max_completion_length")
    high = clip_eps if clip_eps_high is None else clip_eps_high
    mask = mask.float()
    ratio = torch.exp(logp - old_logp)
    adv = advantages.unsqueeze(1)
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - clip_eps, 1 + high) * adv)
    kl = k3_kl(logp, ref_logp)
    per_token = (-surrogate + kl_coef * kl) * mask
    lengths = mask.sum(1).clamp(min=1)
    if loss_type == "grpo":
        loss = (per_token.sum(1) / lengths).mean()
    elif loss_type == "dr_grpo":
        loss = per_token.sum() / (per_token.shape[0] * max_completion_length)
    else:
        loss = per_token.sum() / mask.sum().clamp(min=1)
    clipped = (((ratio < 1 - clip_eps) & (adv < 0)) | ((ratio > 1 + high) & (adv > 0))).float()
    metrics = {
        "kl": ((kl.detach() * mask).sum(1) / lengths).mean(),
        "clip_frac": ((clipped * mask).sum() / mask.sum().clamp(min=1)),
    }
    return loss, metrics
