"""A GPT with a classification head: a linear map from the final hidden state of each row's last real
token to one logit per class. The layout is transformers' LlamaForSequenceClassification (`score.weight`,
no bias), so `orch export --hf` of a classify run is that model.

    model = GPTClassifier(cfg, num_labels=3, train_last_blocks=2)   # blocks 0..n-3 and the embedding frozen
    logits = model(tokens, last)                                    # [batch, num_labels], float32
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from model.config import GPTConfig
from model.gpt import GPT, fill_param as _fill


class GPTClassifier(GPT):
    # Absent from a language model's checkpoint: kept at their init when loading one (training/checkpoint.py).
    fresh_keys = ("score.weight",)
    lora_modules_to_save = ("score",)  # with LoRA the head still trains (and is saved) whole

    def __init__(self, cfg: GPTConfig, num_labels: int, train_last_blocks: Optional[int] = None):
        super().__init__(cfg)
        self.num_labels = num_labels
        self.score = nn.Linear(cfg.d_model, num_labels, bias=False)
        if train_last_blocks is not None:  # only the last N blocks, the final norm and the head learn
            if train_last_blocks > cfg.n_layer:
                raise ValueError(
                    f"classify.train_last_blocks={train_last_blocks} exceeds the model's {cfg.n_layer} blocks"
                )
            self.requires_grad_(False)
            for block in list(self.layers)[cfg.n_layer - train_last_blocks :]:
                block.requires_grad_(True)
            self.norm.requires_grad_(True)
            self.score.requires_grad_(True)

    @torch.no_grad()
    def init_weights(self, seed=None) -> None:
        super().init_weights(seed)
        gen = torch.Generator().manual_seed(seed + 1) if seed is not None else None
        _fill(self.score.weight, torch.randn(self.score.weight.shape, generator=gen) * self.cfg.init_std)

    def forward(self, tokens: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """tokens [batch, seq] (right-padded), last [batch] (index of each row's last real token) -> logits.
        (The forward, not a separate method, so that FSDP gathers the parameters as for any forward.)"""
        h = self.hidden(tokens)
        return self.score(h[torch.arange(h.shape[0], device=h.device), last]).float()
