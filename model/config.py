"""GPTConfig: the shape of the model. Lives in `model:` of every job YAML."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

MLPS = ("swiglu", "relu2")


@dataclass
class GPTConfig:
    vocab_size: Optional[int] = None  # None = the tokenizer's size, rounded up to a multiple of 64
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: Optional[int] = None  # grouped-query attention; None = n_head (plain multi-head)
    d_model: int = 256
    ffn_hidden: Optional[int] = None  # None = as many parameters as 4 * d_model in two matrices (see hidden_dim)
    max_seq_len: int = 256  # longest sequence rotary tables are built for
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02
    # Recipe options (docs/recipe.md measures each). The defaults are Llama's layout, which
    # Hugging Face export writes; the others are refused there (llama_incompatibilities).
    mlp: str = "swiglu"  # swiglu: w2(silu(w1 x) * w3 x); relu2: w2(relu(w1 x)^2), two matrices
    qk_norm: bool = False  # RMS-normalize queries and keys per head before rotary (no learned gain)
    logit_softcap: Optional[float] = None  # logits = cap * tanh(logits / cap); None = off

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def hidden_dim(self) -> int:
        """The MLP's width. By default the MLP has the parameters of a 4 * d_model two-matrix MLP:
        relu2 is that MLP; SwiGLU's three matrices get 8/3 * d_model, rounded up to a multiple of 64."""
        if self.ffn_hidden:
            return self.ffn_hidden
        if self.mlp == "relu2":
            return 4 * self.d_model
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
        if self.mlp not in MLPS:
            raise ValueError(f"model.mlp must be one of {', '.join(MLPS)}, got {self.mlp!r}")
        if self.logit_softcap is not None and self.logit_softcap <= 0:
            raise ValueError(f"model.logit_softcap must be positive or null (off), got {self.logit_softcap}")

    def llama_incompatibilities(self) -> list[str]:
        """One sentence per option that a Hugging Face Llama (what export writes) can't represent."""
        problems = []
        if self.mlp != "swiglu":
            problems.append(f"model.mlp={self.mlp!r}: Llama's MLP is SwiGLU (gate, up and down matrices)")
        if self.qk_norm:
            problems.append("model.qk_norm=true: Llama's attention does not normalize queries and keys")
        if self.logit_softcap is not None:
            problems.append(f"model.logit_softcap={self.logit_softcap}: Llama's output logits are not soft-capped")
        return problems
