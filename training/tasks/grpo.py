"""GRPO, Group Relative Policy Optimization (Shao et al. 2024): sample a group of completions per
prompt, score them, and push up those better than their group's average.

Each sampling round: micro_batch_size prompts per rank, grpo.group_size completions each, sampled
from the current policy in one batched, KV-cached call (model/generate.py: each prompt is read once,
stopped rows leave the batch) with a generator seeded by (seed, draw, data-parallel rank), so a
resumed run samples exactly what the uninterrupted one would have. Rewards come from grpo.reward
(a `module:function` or a trained `rm` run folder) or from grpo.rewards, several functions summed with
their weights, each called once per batch (training/posttrain/rewards.py). Advantages are the rewards
centred per group and scaled as grpo.scale_rewards says; the loss (training/posttrain/losses.py) is the
clipped-ratio policy loss plus a k3 KL penalty to the starting model (with LoRA: the policy with adapters
off), aggregated as grpo.loss_type says. With grpo.kl_coef 0 there is no penalty and no reference model is
built or run at all.

grpo.num_iterations updates are made per sampled batch (TRL's num_iterations): the completions and
the log-probs they were sampled with are kept, so from the second update on the ratio moves away
from 1 and the clip (clip_eps, epsilon_high) acts; clip_frac says how often. Log-probs, old and new,
are those of the distribution that sampled: logits / temperature, restricted to the top_k.

Collapse (training/posttrain/collapse.py): a policy can learn to satisfy a reward with one short answer
for everything (the demo once collapsed to `return self`). The logs carry distinct_frac (distinct
completions per group) and, when records hold their reference, len_ratio (completion length over the
reference's first grpo.max_new_tokens tokens). When either falls below its limit the run stops with exit 2
(grpo.stop_on_collapse, the default): the checkpoints saved before are kept, and the message says how to go
on. Stopping rather than rolling back: a rollback would resume the same reward and sampling, which would
collapse again; the reward is what has to change.
Evaluation: greedy completions of held-out prompts: val_parses, val_signature, val_reward, val_distinct_frac,
val_len_ratio.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from jobspec.posttrain_checks import reward_spec
from model.generate import generate
from model.gpt import GPT
from model.lora import adapters_disabled
from training.data.tokenizer import load_tokenizer
from training.metrics import say
from training.posttrain.chat import check_prompt, encode_prompt, padding_id, stop_ids
from training.posttrain.collapse import CollapseError, collapse_reasons, collapse_stats, within_budget
from training.posttrain.examples import ExampleStream, data_files, eval_batches, pad_right
from training.posttrain.jsonl import read_jsonl
from training.posttrain.losses import IGNORE, frac_reward_zero_std, group_advantages, grpo_policy_loss, sampled_logprobs
from training.posttrain.metric_sums import MetricSums
from training.posttrain.rewards import defines_function, load_reward_fn, python_parses, score_batch
from training.run_folder import starting_point

KEYS = ("prompt",)  # checked by _check; a reward may need more of the record (the demo's: "signature", "reference")


class GRPOTask:
    model_class = GPT
    vocab_parallel_loss = False

    def __init__(self, cfg, dist_info, run_dir: Path):
        from training.build import build_model, load_weights, precision

        g = self.g = cfg.grpo
        if g.group_size < 2:
            raise ValueError(f"grpo.group_size={g.group_size}: a group needs at least 2 completions to compare")
        if g.max_new_tokens < 1 or g.temperature <= 0:
            raise ValueError(
                f"grpo.max_new_tokens={g.max_new_tokens} must be >= 1 and grpo.temperature="
                f"{g.temperature} > 0 (sampling is what explores)"
            )
        self.cfg, self.dist = cfg, dist_info
        self.model_cfg, tokenizer_path = starting_point(cfg.checkpoint.init_from, cfg.data.tokenizer)
        self.vocab_size = self.model_cfg.vocab_size
        self.tokenizer_file = tokenizer_path
        self.tokenizer = load_tokenizer(tokenizer_path)
        self.stop_ids = stop_ids(self.tokenizer, chat=True)  # the folder's end-of-sequence ids and end of turn
        self.max_len = min(cfg.data.seq_len, self.model_cfg.max_seq_len)
        train, val = data_files(g, "grpo", "grpo", tokenizer_path, self.max_len, dist_info, max_docs=cfg.data.max_docs)
        self.train = read_jsonl(train, what="grpo.train_file", check=self._check)
        self.val = read_jsonl(val, what="grpo.val_file", check=self._check)[: g.val_prompts or None]
        self.signatures = all("signature" in r for r in self.val)
        self.stream = ExampleStream(
            self.train, cfg.train.micro_batch_size, dist_info.dp_rank, dist_info.dp_size, cfg.seed, "grpo.train_file"
        )
        param_dtype, _ = precision(cfg, dist_info)
        self.reference = None  # with LoRA the reference is the policy with its adapters off
        self.kl = g.kl_coef > 0  # without the KL term the reference is never needed: none is built or run
        if self.kl and not cfg.lora.enabled:
            self.reference = build_model(self.model_cfg, cfg, dist_info, param_dtype, trainable=False)
            load_weights(self.reference, cfg.checkpoint.init_from, dist_info.is_main)
        if not self.kl:
            say("grpo.kl_coef is 0: no reference model is built, and no KL is computed", dist_info.is_main)
        self.reward_model = None
        if Path(g.reward).is_dir():  # a trained reward model scores prompt + completion
            if dist_info.tp > 1:
                raise ValueError(
                    f"grpo.reward={g.reward!r} is a reward model, whose head is not tensor-parallel: "
                    f"use parallel.tp=1 with it (parallel.tp is {dist_info.tp})"
                )
            from model.reward import RewardModel

            rm_cfg, _ = starting_point(g.reward, key="grpo.reward")
            self.reward_model = build_model(
                rm_cfg, cfg, dist_info, param_dtype, trainable=False, model_class=RewardModel
            )
            load_weights(self.reward_model, g.reward, dist_info.is_main)
        elif g.rewards:
            self.reward_fns = [(t.fn, load_reward_fn(reward_spec(t.fn)), float(t.weight)) for t in g.rewards]
        else:
            self.reward_fns = [(g.reward, load_reward_fn(g.reward), 1.0)]
        self.draws = 0  # sampling rounds on this rank so far: part of the sampler's seed
        self.calls = 0  # loss() calls so far: which update of which sampled batch this is
        self.accum = cfg.train.grad_accum_steps
        self.rollouts: dict[int, dict] = {}  # micro-batch slot -> its sampled batch, reused num_iterations times
        self.reward_parts: dict[str, float] = {}  # with several rewards: each one's mean over the last scored batch
        self.metrics = MetricSums()

    def _check(self, record: dict) -> None:
        """A prompt is a string or, as TRL takes it, a list of messages; the template must render it."""
        check_prompt(self.tokenizer, record)

    # ------------------------------------------------------------ sampling and scoring

    def _generator(self, draw: int, salt: int = 0) -> torch.Generator:
        # Tensor-parallel peers share a dp rank, so they sample the same tokens.
        seed = (self.cfg.seed * 1_000_003 + draw) * 10_007 + self.dist.dp_rank * 101 + salt
        return torch.Generator().manual_seed(seed % (2**63))

    def _complete(self, model, records: list[dict], copies: int, temperature: float, generator) -> tuple:
        """(prompt ids, completion ids) per row: each record's prompt `copies` times, consecutively."""
        unique = [encode_prompt(self.tokenizer, r["prompt"]) for r in records]
        room = self.max_len - max(len(p) for p in unique)
        if room < 1:
            raise ValueError(
                f"a prompt of {self.max_len - room} tokens leaves no room to answer in data.seq_len="
                f"{self.max_len} (the model's max_seq_len is {self.model_cfg.max_seq_len})"
            )
        completions = generate(
            model,
            unique,
            min(self.g.max_new_tokens, room),
            temperature=temperature,
            top_k=self.g.top_k,
            stop_tokens=self.stop_ids,
            generator=generator,
            samples=copies,
        )
        return [p for p in unique for _ in range(copies)], completions

    def _reference(self, record: dict) -> Optional[str]:
        """The record's reference, as much of it as a completion may hold (len_ratio compares the two)."""
        return within_budget(record.get("reference"), self.tokenizer, self.g.max_new_tokens)

    def _text(self, completion: list[int]) -> str:
        ids = completion[:-1] if completion and completion[-1] in self.stop_ids else completion
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _rows(self, prompts, completions) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [N, T] = prompt + completion minus the last token; labels = the completion's tokens
        at the positions that predict them, IGNORE elsewhere."""
        rows, labels = [], []
        for p, c in zip(prompts, completions):
            full = p + c
            rows.append(full[:-1])
            labels.append([IGNORE] * (len(p) - 1) + c)
        tokens, labels = pad_right(rows, padding_id(self.tokenizer), labels)
        return tokens.to(self.dist.device), labels.to(self.dist.device)

    def policy_logprobs(self, model, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-token log-probs of the labels under the distribution that sampled them (temperature, top_k)."""
        return sampled_logprobs(model(tokens), labels, self.g.temperature, self.g.top_k)

    @torch.no_grad()
    def _rewards(self, records, copies, prompts, completions) -> torch.Tensor:
        if self.reward_model is not None:
            rows = [p + c for p, c in zip(prompts, completions)]
            tokens, _ = pad_right(rows, padding_id(self.tokenizer))
            last = torch.tensor([len(r) - 1 for r in rows])
            return self.reward_model(tokens.to(self.dist.device), last.to(self.dist.device)).float()
        texts = [self._text(c) for c in completions]
        # each completion's record, told whether the completion ran out of tokens before its stop token
        ended = [bool(c) and c[-1] in self.stop_ids for c in completions]
        rows = [dict(records[i // copies], truncated=not e) for i, e in enumerate(ended)]
        total = torch.zeros(len(texts), dtype=torch.float64)
        for name, fn, weight in self.reward_fns:  # each function once per batch
            scores = torch.tensor(score_batch(fn, texts, rows), dtype=torch.float64)
            if len(self.reward_fns) > 1:
                self.reward_parts[name] = scores.mean().item()
            total += weight * torch.nan_to_num(scores)  # TRL's convention: None (not applicable) counts 0
        return total.float().to(self.dist.device)

    def _rollout(self, model, records: list[dict]) -> dict:
        """Sample a group per prompt, score it, and (for num_iterations > 1) keep the sampling log-probs."""
        g = self.g
        prompts, completions = self._complete(model, records, g.group_size, g.temperature, self._generator(self.draws))
        self.draws += 1
        rewards = self._rewards(records, g.group_size, prompts, completions)
        references = [self._reference(r) for r in records]  # once a record, then one per completion of its group
        rollout = {
            "prompts": prompts,
            "completions": completions,
            "rewards": rewards.tolist(),
            "old_logp": None,
            "references": [references[i // g.group_size] for i in range(len(completions))],
            "reward_parts": dict(self.reward_parts),  # each reward's mean over this batch (several rewards)
        }
        if g.num_iterations > 1:  # the log-probs they were sampled with: the ratio's denominator for every update
            tokens, labels = self._rows(prompts, completions)
            with torch.no_grad():
                rollout["old_logp"] = self.policy_logprobs(model, tokens, labels).tolist()
        return rollout

    # ------------------------------------------------------------ the trainer's interface

    def _fresh(self) -> bool:
        """Whether this call starts a new sampled batch (every num_iterations optimizer steps)."""
        return (self.calls // self.accum) % self.g.num_iterations == 0

    def next_batch(self) -> Optional[list[dict]]:
        # prompts when this micro-batch samples anew (in loss(), which has the model); None when it reuses them
        return self.stream.next() if self._fresh() else None

    def loss(self, model, records: Optional[list[dict]]) -> tuple[torch.Tensor, int]:
        g = self.g
        slot = self.calls % self.accum
        if self._fresh() or slot not in self.rollouts:
            if records is None:  # resumed mid-cycle without the kept batch (see load_state_dict): sample now
                records = self.stream.next()
            self.rollouts[slot] = self._rollout(model, records)
        self.calls += 1
        r = self.rollouts[slot]
        rewards = torch.tensor(r["rewards"], device=self.dist.device)
        advantages = group_advantages(rewards, g.group_size, g.scale_rewards)
        tokens, labels = self._rows(r["prompts"], r["completions"])
        mask = labels != IGNORE
        if g.mask_truncated_completions:  # a completion cut at max_new_tokens is no evidence either way (DAPO)
            ended = torch.tensor([bool(c) and c[-1] in self.stop_ids for c in r["completions"]], device=mask.device)
            mask = mask & ended.unsqueeze(1)
        logp = self.policy_logprobs(model, tokens, labels)
        old = logp.detach() if r["old_logp"] is None else torch.tensor(r["old_logp"], device=logp.device)
        if self.kl:
            with torch.no_grad(), adapters_disabled(model):
                ref_logp = self.policy_logprobs(model if self.reference is None else self.reference, tokens, labels)
        else:
            ref_logp = logp.detach()  # unused: kl_coef is 0
        loss, m = grpo_policy_loss(
            logp,
            old,
            ref_logp,
            advantages,
            mask,
            clip_eps=g.clip_eps,
            kl_coef=g.kl_coef,
            clip_eps_high=g.epsilon_high,
            loss_type=g.loss_type,
            max_completion_length=g.max_new_tokens,
        )
        if not self.kl:
            del m["kl"]  # no reference, no KL (as TRL logs it: only when beta != 0)
        texts = [self._text(c) for c in r["completions"]]
        self.metrics.add(
            {
                "reward_mean": rewards.mean(),
                "reward_std": rewards.std(),
                **m,
                "completion_len": sum(map(len, r["completions"])) / len(r["completions"]),
                "frac_reward_zero_std": frac_reward_zero_std(rewards, g.group_size),
                **{f"rewards/{name}": v for name, v in r.get("reward_parts", {}).items()},
                **collapse_stats(texts, g.group_size, r["references"]),
            }
        )
        self._last_tokens = sum(map(len, r["completions"]))
        # as a sum and its count, so the trainer averages over the whole step: DAPO's mean is over every
        # completion token of the step, GRPO's and Dr. GRPO's over completions (losses.py has the formulas)
        count = int(mask.sum()) if g.loss_type == "dapo" else len(r["completions"])
        return loss * count, count

    def tokens_per_batch(self, batch) -> int:
        return self._last_tokens  # the sampled tokens: the part that costs

    def train_metrics(self) -> dict:
        metrics = self.metrics.mean(self.dist.device, self.dist.world_size)
        collapsed = collapse_reasons(metrics)
        if collapsed and self.g.stop_on_collapse:
            raise CollapseError(
                f"GRPO stopped: its completions collapsed ({', '.join(collapsed)}), so the reward is being "
                "satisfied by one short answer and further steps would only entrench it. The checkpoints saved "
                "before are kept. Change grpo.reward (or lower the learning rate, raise grpo.kl_coef), or set "
                "grpo.stop_on_collapse=false to train on with a warning."
            )
        if collapsed:
            say(
                f"warning: GRPO completions are collapsing ({', '.join(collapsed)}): the reward may be satisfied "
                "by one short answer; check samples before trusting reward_mean",
                self.dist.is_main,
            )
        return metrics

    @torch.no_grad()
    def evaluate(self, model) -> dict:
        sums = MetricSums()
        batch_size = self.cfg.train.micro_batch_size * self.g.group_size
        texts, references = [], []
        for i, (records, weights) in enumerate(
            eval_batches(self.val, batch_size, self.dist.dp_rank, self.dist.dp_size)
        ):
            prompts, completions = self._complete(model, records, 1, self.g.val_temperature, self._generator(i, salt=7))
            rewards = self._rewards(records, 1, prompts, completions).tolist()
            for record, completion, reward, w in zip(records, completions, rewards, weights):
                text = self._text(completion)
                if w:
                    texts.append(text)
                    references.append(self._reference(record))
                # parses and signature where the held-out records name the function they ask for
                code = (
                    {"val_parses": defines_function(text, record), "val_signature": python_parses(text, record)}
                    if self.signatures
                    else {}
                )
                sums.add({**code, "val_reward": reward, "val_completion_len": len(completion)}, w)
        if texts:  # distinct completions over all held-out prompts: greedy answers, one per prompt
            stats = collapse_stats(texts, len(texts), references)
            sums.add({f"val_{k}": v for k, v in stats.items()}, float(len(texts)))
        result = sums.mean(self.dist.device, self.dist.world_size)
        collapsed = collapse_reasons(result, prefix="val_")
        if collapsed:
            say(
                f"warning: GRPO's held-out completions have collapsed ({', '.join(collapsed)}): val_parses and "
                "val_reward say little about writing functions",
                self.dist.is_main,
            )
        return result

    def state_dict(self) -> dict:
        # The kept batches (token ids, rewards, sampling log-probs) too, so that a resume between two updates
        # of one batch makes the same update. Rank 0 writes the state: other ranks' batches are not in it.
        return {
            "stream": self.stream.state_dict(),
            "draws": self.draws,
            "calls": self.calls,
            "rollouts": {str(k): v for k, v in self.rollouts.items()} if self.dist.dp_size == 1 else {},
        }

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state["stream"])
        self.draws = state["draws"]
        self.calls = state.get("calls", 0)
        self.rollouts = {int(k): v for k, v in state.get("rollouts", {}).items()}
        if not self._fresh() and not self.rollouts:
            say(
                "note: resumed between two updates of one sampled batch on several data-parallel ranks: the "
                "batch is sampled afresh (only a single process keeps it in its checkpoint)",
                self.dist.is_main,
            )
