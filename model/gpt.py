"""A decoder-only GPT of the current kind: RMSNorm, rotary positions, SwiGLU, grouped-query attention.

The layout is Llama's, so Hugging Face export is a renaming of weights (see model/state_dict_adapter.py); Qwen2's
query/key/value biases (qkv_bias) and Qwen3's per-head query/key norms (qk_norm) are options. Two more depart
from all three families (GPTConfig.mlp, logit_softcap; measured in docs/recipe.md).
Sizes come from GPTConfig; the same code builds a 1M-parameter test model and a 1B one.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from model.config import GPTConfig
from model.document_attention import BlockMask, flex


def rotary_tables(
    head_dim: int, max_seq_len: int, theta: float, scaling: Optional[dict] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape [max_seq_len, head_dim] in Llama's half-split layout; `scaling` is GPTConfig.rope_scaling."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    if scaling is not None:
        inv_freq = llama3_inv_freq(inv_freq, scaling)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3.1's long-context rotary frequencies (as transformers' _compute_llama3_parameters): wavelengths
    longer than the pretraining context / low_freq_factor are slowed by `factor`, those shorter than
    context / high_freq_factor kept, and the band between interpolated smoothly."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    context = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > context / low, inv_freq / factor, inv_freq)
    smooth = (context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= context / high) & (wavelen <= context / low)
    return torch.where(medium, smoothed, scaled)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [batch, heads, seq, head_dim]; cos/sin: [seq, head_dim] or [batch, 1, seq, head_dim]."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class LayerKV:
    """One layer's keys and values so far, [batch, kv_heads, max_len, head_dim], allocated on first use
    (under tensor parallelism a rank holds only its share of the heads)."""

    def __init__(self, max_len: int):
        self.max_len, self.k, self.v = max_len, None, None

    def extend(self, k: torch.Tensor, v: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k is None:
            shape = (k.shape[0], k.shape[1], self.max_len, k.shape[3])
            self.k, self.v = k.new_empty(shape), v.new_empty(shape)
        end = start + k.shape[2]
        self.k[:, :, start:end], self.v[:, :, start:end] = k, v
        return self.k[:, :, :end], self.v[:, :, :end]


class KVCache:
    """Keys and values of the tokens already seen, so each new token costs one position's work,
    not the whole sequence's. Pass the same cache to every `GPT.forward` call of one generation."""

    def __init__(self, n_layer: int, max_len: int):
        self.layers = [LayerKV(max_len) for _ in range(n_layer)]
        self.length = 0  # tokens cached; the next token's rotary position when none are given

    def select(self, rows: torch.Tensor) -> None:
        """Keep these batch rows, in this order (an index may repeat: rows sharing a prompt)."""
        for layer in self.layers:
            if layer.k is not None:
                layer.k, layer.v = layer.k[rows], layer.v[rows]


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.d_model, cfg.n_head * cfg.head_dim, bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.d_model, cfg.kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.d_model, cfg.kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        if cfg.qk_norm:  # one gain of head_dim shared by every head (Qwen3's q_norm / k_norm)
            self.q_norm = nn.RMSNorm(cfg.head_dim, eps=cfg.norm_eps)
            self.k_norm = nn.RMSNorm(cfg.head_dim, eps=cfg.norm_eps)
        self.wo = nn.Linear(cfg.n_head * cfg.head_dim, cfg.d_model, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: Optional[torch.Tensor | BlockMask] = None,
        kv: Optional[tuple[LayerKV, int]] = None,
    ) -> torch.Tensor:
        bsz, seq, _ = x.shape
        # -1 rather than n_head: under tensor parallelism each rank holds only its share of the heads.
        q = self.wq(x).view(bsz, seq, -1, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(bsz, seq, -1, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(bsz, seq, -1, self.head_dim).transpose(1, 2)
        if hasattr(self, "q_norm"):  # normalized queries and keys bound the attention logits
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if kv is not None:  # (this layer's cache, where these tokens start): attend to the cached ones too
            k, v = kv[0].extend(k, v, kv[1])
        # Grouped-query attention: each kv head serves a group of q heads, read in place (no copy of the cache).
        gqa = k.shape[1] != q.shape[1]
        if isinstance(mask, BlockMask):  # packed documents: only the tiles that share one (document_attention.py)
            out = flex(q, k, v, block_mask=mask, enable_gqa=gqa)
        elif mask is None:
            # One query after a cache attends to every key: is_causal would align it with the first.
            out = F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1, enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.wo(out.transpose(1, 2).reshape(bsz, seq, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x); or relu2: w2(relu(w1 x)^2), which has no w3."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.d_model, cfg.hidden_dim, bias=False)
        if cfg.mlp == "swiglu":
            self.w3 = nn.Linear(cfg.d_model, cfg.hidden_dim, bias=False)
        self.w2 = nn.Linear(cfg.hidden_dim, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "w3"):
            return self.w2(F.silu(self.w1(x)) * self.w3(x))
        return self.w2(F.relu(self.w1(x)).square())


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.attention_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x, cos, sin, mask=None, kv=None):
        x = x + self.attention(self.attention_norm(x), cos, sin, mask, kv=kv)
        return x + self.feed_forward(self.ffn_norm(x))


LOSS_CHUNK_ELEMENTS = 1 << 22  # logits per loss chunk: 16 MB in fp32


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.output = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        # Rotary tables are derived, not learned: non-persistent, so checkpoints hold weights only.
        cos, sin = rotary_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, cfg.rope_scaling)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def to_empty(self, *, device, recurse: bool = True):
        """Materialize a meta-device model. Plain tensors lose their tie on the way (each module
        gets its own new parameter), so tie the output head to the embedding again."""
        super().to_empty(device=device, recurse=recurse)
        if self.cfg.tie_embeddings and self.output.weight is not self.tok_embeddings.weight:
            self.output.weight = self.tok_embeddings.weight
        return self

    @torch.no_grad()
    def init_weights(self, seed: Optional[int] = None) -> None:
        """GPT-2 style: N(0, std), output projections scaled by 1/sqrt(2 * n_layer).

        Called after the model is materialized (it may be built on the meta device and sharded first).
        """
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layer)
        for name, p in self.named_parameters():
            if name.endswith(".bias"):
                fill_param(p, torch.zeros(p.shape))
            elif p.ndim == 1:  # norm gains
                fill_param(p, torch.ones(p.shape))
            else:
                scale = out_std if name.endswith(("wo.weight", "w2.weight")) else std
                fill_param(p, torch.randn(p.shape, generator=gen) * scale)
        cos, sin = rotary_tables(self.cfg.head_dim, self.cfg.max_seq_len, self.cfg.rope_theta, self.cfg.rope_scaling)
        self.rope_cos.copy_(cos.to(self.rope_cos.device))
        self.rope_sin.copy_(sin.to(self.rope_sin.device))

    def hidden(
        self,
        tokens: torch.Tensor,
        position_ids: Optional[torch.Tensor] = None,
        mask: Optional[torch.Tensor] = None,
        cache: Optional[KVCache] = None,
    ) -> torch.Tensor:
        """The final normed hidden states [batch, seq, d_model]: what heads (LM, reward) read.

        position_ids [batch, seq] restart rotary positions per packed document; mask is a boolean
        attention mask [batch, 1, seq, seq] (True = may attend) for packed or padded batches, or for
        packed ones a flex_attention BlockMask (model/document_attention.py).
        With a cache, tokens follow the cache.length cached ones: positions default to continue
        from there, and a mask covers [batch, 1, seq, cache.length + seq] keys.
        """
        seq = tokens.shape[1]
        start = cache.length if cache is not None else 0
        if start + seq > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {start + seq} tokens exceeds model.max_seq_len={self.cfg.max_seq_len}")
        if position_ids is None:
            cos, sin = self.rope_cos[start : start + seq], self.rope_sin[start : start + seq]
        else:
            cos, sin = self.rope_cos[position_ids].unsqueeze(1), self.rope_sin[position_ids].unsqueeze(1)
        if mask is None and start > 0 and seq > 1:  # causal, shifted past the cached tokens
            mask = torch.ones(seq, start + seq, dtype=torch.bool, device=tokens.device).tril(diagonal=start)
        h = self.tok_embeddings(tokens)
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, mask) if cache is None else layer(h, cos, sin, mask, kv=(cache.layers[i], start))
        if cache is not None:
            cache.length = start + seq
        return self.norm(h)

    def forward(
        self,
        tokens: torch.Tensor,
        position_ids: Optional[torch.Tensor] = None,
        mask: Optional[torch.Tensor] = None,
        cache: Optional[KVCache] = None,
        targets: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """tokens [batch, seq] -> logits [batch, seq, vocab], float32; or, given targets [batch, seq],
        the summed cross-entropy of predicting them (nats), without ever holding all the logits."""
        h = self.hidden(tokens, position_ids, mask, cache)
        return self.logits(h) if targets is None else self.loss(h, targets)

    def loss(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Summed cross-entropy of hidden states [batch, seq, d_model] against targets [batch, seq].

        A few sequences at a time: each chunk's fp32 logits stay near LOSS_CHUNK_ELEMENTS. Memory is the
        GPU's reason; on CPUs, glibc maps every block over 32 MB afresh from the kernel, and the page
        faults of a step's full logits cost a fifth of the demo's step (docs/performance.md)."""
        rows = max(1, LOSS_CHUNK_ELEMENTS // (h.shape[1] * self.cfg.vocab_size))
        return sum(
            F.cross_entropy(self.logits(h_part).flatten(0, 1), t_part.flatten(), reduction="sum")
            for h_part, t_part in zip(h.split(rows), targets.split(rows))
        )

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Hidden states [..., d_model] -> float32 logits [..., vocab]."""
        logits = self.output(h).float()
        if self.cfg.logit_softcap is not None:  # smoothly bounded logits: no token's score runs away early on
            cap = self.cfg.logit_softcap
            logits = cap * torch.tanh(logits / cap)
        return logits

    def new_cache(self, max_len: Optional[int] = None) -> KVCache:
        return KVCache(len(self.layers), max_len or self.cfg.max_seq_len)

    def num_params(self, exclude_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embedding and not self.cfg.tie_embeddings:
            n -= self.tok_embeddings.weight.numel()
        return n


def fill_param(param: torch.Tensor, value: torch.Tensor) -> None:
    """Copy a full tensor into a parameter that may be a DTensor shard."""
    if hasattr(param, "device_mesh"):  # DTensor: keep only this rank's shard of the full value
        from torch.distributed.tensor import distribute_tensor

        value = distribute_tensor(value.to(param.dtype), param.device_mesh, param.placements)
        param.copy_(value)
    else:
        param.copy_(value.to(param.dtype))


def flops_per_token(cfg: GPTConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 per matmul weight (forward + backward) plus attention scores.

    PaLM's accounting: embedding lookups are free, the output projection is not;
    attention adds 12 * layers * d_model * seq_len (QK^T and AV, forward and backward).
    """
    d, h, kv, hd = cfg.d_model, cfg.n_head, cfg.kv_heads, cfg.head_dim
    mlp_matrices = 3 if cfg.mlp == "swiglu" else 2
    per_layer = d * h * hd + 2 * d * kv * hd + h * hd * d + mlp_matrices * d * cfg.hidden_dim
    matmul_params = cfg.n_layer * per_layer + d * cfg.vocab_size
    return 6.0 * matmul_params + 12.0 * cfg.n_layer * d * seq_len
