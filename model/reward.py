"""The reward model: our GPT with a scalar value head on the final hidden state of a sequence's last real token
(the layout of a sequence classifier with one label). Trained by training/tasks/rm.py; GRPO can score with it.
"""

from __future__ import annotations

import torch
from torch import nn

from model.gpt import GPT, fill_param


class RewardModel(GPT):
    # Absent from a language model's checkpoint: kept at their init when loading one (training/checkpoint.py).
    fresh_keys = ("value_head.weight",)

    def __init__(self, cfg):
        super().__init__(cfg)
        self.value_head = nn.Linear(cfg.d_model, 1, bias=False)

    @torch.no_grad()
    def init_weights(self, seed=None) -> None:
        super().init_weights(seed)
        fill_param(self.value_head.weight, torch.zeros(self.value_head.weight.shape))

    def forward(self, tokens: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """tokens [batch, seq], last [batch] (index of each row's last real token) -> rewards [batch], float32.
        (The forward, not a separate method, so that FSDP gathers the parameters as for any forward.)"""
        h = self.hidden(tokens)
        return self.value_head(h[torch.arange(h.shape[0], device=h.device), last]).squeeze(-1).float()
