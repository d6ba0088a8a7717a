"""Direct Preference Optimization: raise the answers people chose over the ones they rejected,
relative to a frozen copy of the starting model (Rafailov et al. 2023).

The policy starts from checkpoint.init_from (normally an SFT run); the reference is the same
weights, frozen, and its log-probs are computed alongside, without gradients. With lora.enabled the
reference is the policy itself with its adapters off (the base), so no second copy is built. Evaluation is the
held-out preference accuracy: the share of pairs whose chosen answer gets the higher implicit
reward beta * (log pi - log ref).
"""

from __future__ import annotations

from pathlib import Path

import torch

from model.gpt import GPT
from model.lora import adapters_disabled
from training.posttrain.losses import dpo_loss, sequence_logprobs
from training.posttrain.metric_sums import MetricSums
from training.posttrain.pairs import PreferenceData


class DPOTask:
    model_class = GPT
    vocab_parallel_loss = False

    def __init__(self, cfg, dist_info, run_dir: Path):
        from training.build import build_model, load_weights, precision

        self.cfg, self.dist = cfg, dist_info
        self.beta = cfg.dpo.beta
        if self.beta <= 0:
            raise ValueError(f"dpo.beta={self.beta} must be positive (typical values 0.05 to 0.5)")
        self.data = PreferenceData(cfg, dist_info, "dpo")
        self.model_cfg = self.data.model_cfg  # the trainer builds the policy in the source's shape
        self.tokenizer_file = self.data.tokenizer_file
        self.vocab_size = self.model_cfg.vocab_size
        self.reference = None  # with LoRA the reference is the policy with its adapters off: no second copy
        if not cfg.lora.enabled:
            param_dtype, _ = precision(cfg, dist_info)
            self.reference = build_model(self.model_cfg, cfg, dist_info, param_dtype, trainable=False)
            load_weights(self.reference, cfg.checkpoint.init_from, dist_info.is_main)
        self.metrics = MetricSums()

    def next_batch(self) -> dict:
        return self.data.next_batch()

    def _logprobs(self, model, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Sequence log-probs of the answers under the model and under the reference, [2B] each."""
        policy = sequence_logprobs(model(batch["tokens"]), batch["labels"])
        with torch.no_grad(), adapters_disabled(model):
            reference = model if self.reference is None else self.reference
            reference = sequence_logprobs(reference(batch["tokens"]), batch["labels"])
        return policy, reference

    def loss(self, model, batch) -> tuple[torch.Tensor, int]:
        policy, reference = self._logprobs(model, batch)
        half = policy.shape[0] // 2
        loss, metrics = dpo_loss(policy[:half], policy[half:], reference[:half], reference[half:], self.beta)
        self.metrics.add(metrics)
        return loss * half, half  # dpo_loss is the mean over the pairs

    def tokens_per_batch(self, batch) -> int:
        return batch["tokens"].numel()

    def train_metrics(self) -> dict:
        return self.metrics.mean(self.dist.device, self.dist.world_size)

    @torch.no_grad()
    def evaluate(self, model) -> dict:
        sums = MetricSums()
        for batch, weights in self.data.val_batches():
            policy, reference = self._logprobs(model, batch)
            half = policy.shape[0] // 2
            for i in range(half):  # per pair, so the padding pairs (weight 0) count for nothing
                loss, m = dpo_loss(
                    policy[i : i + 1],
                    policy[half + i : half + i + 1],
                    reference[i : i + 1],
                    reference[half + i : half + i + 1],
                    self.beta,
                )
                sums.add(
                    {
                        "val_loss": loss,
                        "val_accuracy": m["rewards/accuracies"],
                        **{f"val_{k}": v for k, v in m.items() if k != "rewards/accuracies"},
                    },
                    float(weights[i]),
                )
        return sums.mean(self.dist.device, self.dist.world_size)

    def state_dict(self) -> dict:
        return {"stream": self.data.stream.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.data.stream.load_state_dict(state["stream"])
