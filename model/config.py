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
    qk_norm: bool = False  # RMS-normalize queries and keys per head before rotary, learned gains (Qwen3's q/k_norm)
    logit_softcap: Optional[float] = None  # logits = cap * tanh(logits / cap); None = off
    # Options of the Hugging Face families import reads (docs/huggingface.md, "Families"):
    qkv_bias: bool = False  # biases on the query, key and value projections (Qwen2's attention)
    head_size: Optional[int] = None  # width of one attention head; None = d_model / n_head (Qwen3 sets its own)
    # Rotary frequencies stretched for long contexts, as config.json writes it: None (plain rotary) or Llama 3.1's
    # {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}
    rope_scaling: Optional[dict] = None
    # A named shape from SIZES (jobspec/loading.py fills in its keys; keys the job writes win); None = the keys above
    size: Optional[str] = None

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def head_dim(self) -> int:
        return self.head_size or self.d_model // self.n_head

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
        if self.head_size is None and self.d_model % self.n_head:
            raise ValueError(f"model.d_model ({self.d_model}) must be divisible by model.n_head ({self.n_head})")
        if self.n_head % self.kv_heads:
            raise ValueError(f"model.n_head ({self.n_head}) must be divisible by model.n_kv_head ({self.kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"the head dimension d_model/n_head = {self.head_dim} must be even for rotary positions")
        if self.mlp not in MLPS:
            raise ValueError(f"model.mlp must be one of {', '.join(MLPS)}, got {self.mlp!r}")
        if self.logit_softcap is not None and self.logit_softcap <= 0:
            raise ValueError(f"model.logit_softcap must be positive or null (off), got {self.logit_softcap}")
        if self.rope_scaling is not None:
            check_rope_scaling(self.rope_scaling)
        if self.size is not None and self.size not in SIZES:
            raise ValueError(f"model.size must be one of {', '.join(SIZES)} or null, got {self.size!r}")

    def llama_incompatibilities(self) -> list[str]:
        """One sentence per option that no Hugging Face family export writes (Llama; Qwen2 for qkv_bias, Qwen3 for
        qk_norm) can represent."""
        problems = []
        if self.mlp != "swiglu":
            problems.append(f"model.mlp={self.mlp!r}: Llama's MLP is SwiGLU (gate, up and down matrices)")
        if self.qk_norm and self.qkv_bias:
            problems.append("model.qkv_bias=true with model.qk_norm=true: Qwen3's attention_bias also biases o_proj")
        if self.logit_softcap is not None:
            problems.append(f"model.logit_softcap={self.logit_softcap}: Llama's output logits are not soft-capped")
        return problems


ROPE_SCALING_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def check_rope_scaling(scaling) -> None:
    """ValueError unless `scaling` is Llama 3.1's rotary scaling with its four numbers."""
    kind = scaling.get("rope_type", scaling.get("type")) if isinstance(scaling, dict) else None
    if kind != "llama3":
        raise ValueError(f"model.rope_scaling must be null or of rope_type 'llama3', got {scaling!r}")
    for key in ROPE_SCALING_KEYS:
        if not isinstance(scaling.get(key), (int, float)) or scaling[key] <= 0:
            raise ValueError(f"model.rope_scaling.{key} must be a positive number, got {scaling.get(key)!r}")
    if scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
        raise ValueError(
            f"model.rope_scaling.high_freq_factor ({scaling['high_freq_factor']}) must exceed "
            f"low_freq_factor ({scaling['low_freq_factor']})"
        )


# The named shapes a job selects with `model.size` (torchtitan keeps its flavors so). GPT-3's shapes (Brown et al.
# 2020, table 2.1: tied embeddings) with GPT-2's vocabulary padded to a multiple of 64; Llama-2-7B's and
# Llama-3-8B's own configs (their Hugging Face config.json). bench/ and tests/gpu/ take their shapes from here.
SIZES: dict[str, GPTConfig] = {
    "demo": GPTConfig(n_layer=4, n_head=4, n_kv_head=2, d_model=256, max_seq_len=256),  # jobs/pretrain.yaml's 4M
    "125m": GPTConfig(vocab_size=50304, n_layer=12, n_head=12, d_model=768, max_seq_len=2048),
    "350m": GPTConfig(vocab_size=50304, n_layer=24, n_head=16, d_model=1024, max_seq_len=2048),
    "760m": GPTConfig(vocab_size=50304, n_layer=24, n_head=16, d_model=1536, max_seq_len=2048),
    "1.3b": GPTConfig(vocab_size=50304, n_layer=24, n_head=32, d_model=2048, max_seq_len=2048),
    "7b": GPTConfig(
        vocab_size=32000, n_layer=32, n_head=32, d_model=4096, ffn_hidden=11008, max_seq_len=4096, tie_embeddings=False
    ),
    "8b": GPTConfig(
        vocab_size=128256,
        n_layer=32,
        n_head=32,
        n_kv_head=8,
        d_model=4096,
        ffn_hidden=14336,
        max_seq_len=8192,
        rope_theta=500000.0,
        tie_embeddings=False,
    ),
}
for _name, _cfg in SIZES.items():
    _cfg.size = _name


def size_keys(name: str) -> dict:
    """The keys of a named size, as a job's `model:` section would write them (size included)."""
    from dataclasses import asdict

    return asdict(SIZES[name])
