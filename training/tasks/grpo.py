"""GRPO, Group Relative Policy Optimization (Shao et al. 2024): sample a group of completions per
prompt, score them, and push up those better than their group's average.

Each micro-batch: micro_batch_size prompts per rank, grpo.group_size completions each, sampled
from the current policy (KV-cached, model/generate.py) with a generator seeded by (seed, draw,
data-parallel rank), so a resumed run samples exactly what the uninterrupted one would have.
Rewards come from grpo.reward: a `module:function` (default: does the completion parse as Python
and keep the requested signature) or a trained `rm` run folder. Advantages are the rewards
normalized within each group; the loss is the clipped-ratio policy loss plus a k3 KL penalty to
the frozen starting model. One update per batch of samples, so the ratio is 1 in value (not in
gradient) and the clip matters only if several updates are made per batch.

Evaluation: greedy completions (grpo.val_temperature=0) of held-out prompts; val_parses is the
share that parse as Python and define a function, val_signature the share that also keep the
requested signature (the default reward), val_reward the mean of grpo.reward.
"""

from __future__ import annotations

from pathlib import Path

import torch

from model.generate import generate
from model.gpt import GPT
from training.data.tokenizer import PAD_ID, load_tokenizer
from training.posttrain.chat import encode_prompt, end_of_turn_id
from training.posttrain.examples import ExampleStream, data_files, eval_batches, pad_right
from training.posttrain.jsonl import read_jsonl
from training.posttrain.losses import IGNORE, frac_reward_zero_std, group_advantages, grpo_policy_loss, token_logprobs
from training.posttrain.metric_sums import MetricSums
from training.posttrain.rewards import defines_function, load_reward_fn, python_parses
from training.run_folder import starting_point

KEYS = ("prompt", "signature")


class GRPOTask:
    model_class = GPT

    def __init__(self, cfg, dist_info):
        from training.trainer import build_model, load_weights, precision

        g = self.g = cfg.grpo
        if g.group_size < 2:
            raise ValueError(f"grpo.group_size={g.group_size}: a group needs at least 2 completions to compare")
        if g.max_new_tokens < 1 or g.temperature <= 0:
            raise ValueError(f"grpo.max_new_tokens={g.max_new_tokens} must be >= 1 and grpo.temperature="
                             f"{g.temperature} > 0 (sampling is what explores)")
        self.cfg, self.dist = cfg, dist_info
        self.model_cfg, tokenizer_path = starting_point(cfg.checkpoint.init_from, cfg.data.tokenizer)
        self.vocab_size = self.model_cfg.vocab_size
        self.tokenizer_file = tokenizer_path
        self.tokenizer = load_tokenizer(tokenizer_path)
        self.stop_id = end_of_turn_id(self.tokenizer)
        self.max_len = min(cfg.data.seq_len, self.model_cfg.max_seq_len)
        train, val = data_files(g, "grpo", "grpo", tokenizer_path, self.max_len, dist_info, max_docs=cfg.data.max_docs)
        self.train = read_jsonl(train, KEYS, what="grpo.train_file")
        self.val = read_jsonl(val, KEYS, what="grpo.val_file")[:g.val_prompts or None]
        self.stream = ExampleStream(self.train, cfg.train.micro_batch_size, dist_info.dp_rank, dist_info.dp_size,
                                    cfg.seed, "grpo.train_file")
        param_dtype, _ = precision(cfg, dist_info)
        self.reference = build_model(self.model_cfg, cfg, dist_info, param_dtype, trainable=False)
        load_weights(self.reference, cfg.checkpoint.init_from, dist_info.is_main)
        self.reward_model = None
        if Path(g.reward).is_dir():  # a trained reward model scores prompt + completion
            from model.reward import RewardModel

            rm_cfg, _ = starting_point(g.reward, key="grpo.reward")
            self.reward_model = build_model(rm_cfg, cfg, dist_info, param_dtype, trainable=False,
                                            model_class=RewardModel)
            load_weights(self.reward_model, g.reward, dist_info.is_main)
        else:
            self.reward_fn = load_reward_fn(g.reward)
        self.draws = 0  # micro-batches sampled on this rank so far: part of the sampler's seed
        self.metrics = MetricSums()

    # ------------------------------------------------------------ sampling and scoring

    def _generator(self, draw: int, salt: int = 0) -> torch.Generator:
        # Tensor-parallel peers share a dp rank, so they sample the same tokens.
        seed = (self.cfg.seed * 1_000_003 + draw) * 10_007 + self.dist.dp_rank * 101 + salt
        return torch.Generator().manual_seed(seed % (2 ** 63))

    def _complete(self, model, records: list[dict], copies: int, temperature: float, generator) -> tuple:
        """(prompt ids, completion ids) per row: each record's prompt repeated `copies` times."""
        prompts = [encode_prompt(self.tokenizer, r["prompt"]) for r in records for _ in range(copies)]
        room = self.max_len - max(len(p) for p in prompts)
        if room < 1:
            raise ValueError(f"a prompt of {self.max_len - room} tokens leaves no room to answer in data.seq_len="
                             f"{self.max_len} (the model's max_seq_len is {self.model_cfg.max_seq_len})")
        completions = generate(model, prompts, min(self.g.max_new_tokens, room), temperature=temperature,
                               top_k=self.g.top_k, stop_tokens=[self.stop_id], generator=generator)
        return prompts, completions

    def _text(self, completion: list[int]) -> str:
        ids = completion[:-1] if completion and completion[-1] == self.stop_id else completion
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _rows(self, prompts, completions) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [N, T] = prompt + completion minus the last token; labels = the completion's tokens
        at the positions that predict them, IGNORE elsewhere."""
        rows, labels = [], []
        for p, c in zip(prompts, completions):
            full = p + c
            rows.append(full[:-1])
            labels.append([IGNORE] * (len(p) - 1) + c)
        tokens, labels = pad_right(rows, PAD_ID, labels)
        return tokens.to(self.dist.device), labels.to(self.dist.device)

    @torch.no_grad()
    def _rewards(self, records, copies, prompts, completions) -> torch.Tensor:
        if self.reward_model is not None:
            rows = [p + c for p, c in zip(prompts, completions)]
            tokens, _ = pad_right(rows, PAD_ID)
            last = torch.tensor([len(r) - 1 for r in rows])
            return self.reward_model(tokens.to(self.dist.device), last.to(self.dist.device)).float()
        texts = [self._text(c) for c in completions]
        rewards = [float(self.reward_fn(t, records[i // copies])) for i, t in enumerate(texts)]
        return torch.tensor(rewards, device=self.dist.device)

    # ------------------------------------------------------------ the trainer's interface

    def next_batch(self) -> list[dict]:
        return self.stream.next()  # prompts; completions are sampled in loss(), which has the model

    def loss(self, model, records: list[dict]) -> torch.Tensor:
        g = self.g
        prompts, completions = self._complete(model, records, g.group_size, g.temperature, self._generator(self.draws))
        self.draws += 1
        rewards = self._rewards(records, g.group_size, prompts, completions)
        advantages = group_advantages(rewards, g.group_size)
        tokens, labels = self._rows(prompts, completions)
        logp = token_logprobs(model(tokens), labels)
        with torch.no_grad():
            ref_logp = token_logprobs(self.reference(tokens), labels)
        loss, m = grpo_policy_loss(logp, logp.detach(), ref_logp, advantages, labels != IGNORE,
                                   clip_eps=g.clip_eps, kl_coef=g.kl_coef)
        self.metrics.add({"reward_mean": rewards.mean(), "reward_std": rewards.std(), **m,
                          "completion_len": sum(map(len, completions)) / len(completions),
                          "frac_reward_zero_std": frac_reward_zero_std(rewards, g.group_size)})
        self._last_tokens = sum(map(len, completions))
        return loss

    def tokens_per_batch(self, batch) -> int:
        return self._last_tokens  # the sampled tokens: the part that costs

    def train_metrics(self) -> dict:
        return self.metrics.mean(self.dist.device, self.dist.world_size)

    @torch.no_grad()
    def evaluate(self, model) -> dict:
        sums = MetricSums()
        batch_size = self.cfg.train.micro_batch_size * self.g.group_size
        for i, (records, weights) in enumerate(eval_batches(self.val, batch_size, self.dist.dp_rank,
                                                            self.dist.dp_size)):
            prompts, completions = self._complete(model, records, 1, self.g.val_temperature,
                                                  self._generator(i, salt=7))
            rewards = self._rewards(records, 1, prompts, completions).tolist()
            for record, completion, reward, w in zip(records, completions, rewards, weights):
                text = self._text(completion)
                sums.add({"val_parses": defines_function(text, record), "val_signature": python_parses(text, record),
                          "val_reward": reward, "val_completion_len": len(completion)}, w)
        return sums.mean(self.dist.device, self.dist.world_size)

    def state_dict(self) -> dict:
        return {"stream": self.stream.state_dict(), "draws": self.draws}

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state["stream"])
        self.draws = state["draws"]
