"""Reward model: a GPT with a scalar value head, trained on preference pairs with the
Bradley-Terry loss -log sigmoid(r_chosen - r_rejected) (Ouyang et al. 2022).

The reward of prompt + answer is the head applied to the final hidden state of its last real
token (the answer's closing <|im_end|>). The head is a parameter of the model like any other,
so checkpoints save and load it; starting from a language model, it starts at zero.
Evaluation: held-out pairwise accuracy, the share of pairs whose chosen answer scores higher.
"""

from __future__ import annotations

from pathlib import Path

import torch

from model.reward import RewardModel
from training.posttrain.losses import bradley_terry_loss
from training.posttrain.metric_sums import MetricSums
from training.posttrain.pairs import PreferenceData


class RewardModelTask:
    model_class = RewardModel  # the trainer builds this instead of a plain GPT
    vocab_parallel_loss = False

    def __init__(self, cfg, dist_info, run_dir: Path):
        # parallel.tp > 1 is refused when the job is loaded (jobspec/checks.py): the head is not tensor-parallel.
        self.cfg, self.dist = cfg, dist_info
        self.data = PreferenceData(cfg, dist_info, "rm")
        self.model_cfg = self.data.model_cfg
        self.tokenizer_file = self.data.tokenizer_file
        self.vocab_size = self.model_cfg.vocab_size
        self.metrics = MetricSums()

    def next_batch(self) -> dict:
        return self.data.next_batch()

    def _rewards(self, model, batch) -> tuple[torch.Tensor, torch.Tensor]:
        rewards = model(batch["tokens"], batch["last"])
        half = rewards.shape[0] // 2
        return rewards[:half], rewards[half:]

    def loss(self, model, batch) -> tuple[torch.Tensor, int]:
        chosen, rejected = self._rewards(model, batch)
        loss, metrics = bradley_terry_loss(chosen, rejected)
        self.metrics.add(metrics)
        return loss * chosen.shape[0], chosen.shape[0]  # the mean over the pairs, as a sum

    def tokens_per_batch(self, batch) -> int:
        return batch["tokens"].numel()

    def train_metrics(self) -> dict:
        return self.metrics.mean(self.dist.device, self.dist.world_size)

    @torch.no_grad()
    def evaluate(self, model) -> dict:
        sums = MetricSums()
        for batch, weights in self.data.val_batches():
            chosen, rejected = self._rewards(model, batch)
            for i in range(chosen.shape[0]):  # per pair, so the padding pairs (weight 0) count for nothing
                loss, m = bradley_terry_loss(chosen[i : i + 1], rejected[i : i + 1])
                sums.add(
                    {
                        "val_loss": loss,
                        "val_accuracy": m["rewards/accuracies"],
                        "val_rewards/margins": m["rewards/margins"],
                    },
                    float(weights[i]),
                )
        return sums.mean(self.dist.device, self.dist.world_size)

    def state_dict(self) -> dict:
        return {"stream": self.data.stream.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.data.stream.load_state_dict(state["stream"])
