"""GPTConfig: the shape of the model. Lives in `model:` of every job YAML."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class GPTConfig:
    vocab_size: Optional[int] = None  # None = the tokenizer's size, rounded up to a multiple of 64
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: Optional[int] = None  # grouped-query attention; None = n_head (plain multi-head)
    d_model: int = 256
    ffn_hidden: Optional[int] = None  # None = 8/3 * d_model rounded up to a multiple of 64 (SwiGLU)
    max_seq_len: int = 256  # longest sequence rotary tables are built for
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def hidden_dim(self) -> int:
        if self.ffn_hidden:
            return self.ffn_hidden
        return 64 * ((int(8 * self.d_model / 3) + 63) // 64)

    def validate(self) -> None:
        """Raise ValueError naming the key at fault; called before building the model."""
        if self.vocab_size is None or self.vocab_size <= 0:
            raise ValueError(f"model.vocab_size must be a positive integer, got {self.vocab_size}")
        if self.d_model % self.n_head:
            raise ValueError(f"model.d_model ({self.d_model}) must be divisible by model.n_head ({self.n_head})")
        if self.n_head % self.kv_heads:
            raise ValueError(f"model.n_head ({self.n_head}) must be divisible by model.n_kv_head ({self.kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"the head dimension d_model/n_head = {self.head_dim} must be even for rotary positions")
