"""LoRA, low-rank adapters (Hu et al. 2021): train a small update B @ A beside each chosen projection,
the base weights frozen.

    y = x W^T + dropout(x) A^T B^T * (alpha / rank)        A [rank, in], B [out, rank], B = 0 at the start

    wrapped = apply_lora(model, rank=16, alpha=32, target_modules=["wq", "wv"])  # before parallelizing
    init_lora_weights(model, seed)          # after init_weights / materializing: A random, B zero
    with adapters_disabled(model): ...      # the base model (DPO's reference, GRPO's KL reference)
    merge_adapters(model) / unmerge_adapters(model)   # fold the update into W and back (unsharded models)

Targets are our module names (wq, wk, wv, wo, w1, w2, w3, or a longer suffix such as
`layers.0.attention.wq`). A wrapped projection keeps its weight's name (`layers.0.attention.wq.weight`),
so a base checkpoint loads into it as it is; the adapters are `...wq.lora_A.weight` and
`...wq.lora_B.weight`, PEFT's names under its `base_model.model.` prefix (training/peft_export.py).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from model.gpt import fill_param as _fill


class LoRALinear(nn.Linear):
    """An nn.Linear that shares the base layer's weight (and bias, if it has one: Qwen2's q/k/v) and adds a
    low-rank update."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias  # frozen with the weight; a merge leaves it as it is
        device, dtype = base.weight.device, base.weight.dtype
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, device=device, dtype=dtype)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        self.adapters_enabled = True
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        if self.adapters_enabled and not self.merged:
            out = out + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling
        return out

    def delta(self) -> torch.Tensor:
        """The update B @ A * scaling, in the weight's shape [out, in]."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, alpha={self.alpha}"


def linear_names(model: nn.Module) -> list[str]:
    """The projections LoRA may wrap: every nn.Linear inside the transformer blocks."""
    return [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and n.startswith("layers.") and ".lora_" not in n
    ]


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def apply_lora(
    model: nn.Module,
    rank: int,
    alpha: float,
    target_modules: Sequence[str],
    dropout: float = 0.0,
    modules_to_save: Sequence[str] = (),
) -> list[str]:
    """Wrap every projection named by target_modules in a LoRALinear, freeze everything else except
    modules_to_save, and record on the model which state-dict keys its checkpoints hold
    (`checkpoint_keys`: the trainable ones) and which a base checkpoint lacks (`fresh_keys`).
    Call on an unparallelized model (the meta device is fine). Returns the wrapped module names.

    A ValueError names a target that matches no projection, or a module_to_save that doesn't exist."""
    if rank < 1:
        raise ValueError(f"lora.rank={rank} must be at least 1")
    candidates = linear_names(model)
    short = sorted({n.rsplit(".", 1)[-1] for n in candidates})
    for target in target_modules:
        if not any(_matches(n, target) for n in candidates):
            raise ValueError(
                f"lora.target_modules has {target!r}, which matches no projection of the model "
                f"(its projections are named {', '.join(short)}, e.g. layers.0.attention.wq)"
            )
    modules = dict(model.named_modules())
    for name in modules_to_save:
        if name not in modules:
            top = sorted(n for n in modules if n and "." not in n)
            raise ValueError(
                f"lora.modules_to_save has {name!r}, which is no module of the model "
                f"(top-level modules: {', '.join(top)})"
            )
    wrapped = [n for n in candidates if any(_matches(n, t) for t in target_modules)]
    for name in wrapped:
        parent_name, _, child = name.rpartition(".")
        setattr(modules[parent_name], child, LoRALinear(modules[name], rank, alpha, dropout))
    model.requires_grad_(False)
    for name, p in model.named_parameters():
        if ".lora_" in name or any(name.startswith(m + ".") for m in modules_to_save):
            p.requires_grad_(True)
    lora_keys = tuple(n for n, _ in model.named_parameters() if ".lora_" in n)
    model.checkpoint_keys = frozenset(n for n, p in model.named_parameters() if p.requires_grad)
    model.fresh_keys = tuple(getattr(model, "fresh_keys", ())) + lora_keys
    return wrapped


def lora_modules(model: nn.Module) -> Iterator[LoRALinear]:
    return (m for m in model.modules() if isinstance(m, LoRALinear))


def has_lora(model: nn.Module) -> bool:
    return any(True for _ in lora_modules(model))


@torch.no_grad()
def init_lora_weights(model: nn.Module, seed: Optional[int] = None) -> None:
    """PEFT's default start: A ~ U(-1/sqrt(in), 1/sqrt(in)) (kaiming-uniform, a=sqrt(5)), B = 0,
    so the wrapped model starts as its base. Works on DTensor shards."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    for m in lora_modules(model):
        bound = 1.0 / math.sqrt(m.in_features)
        _fill(m.lora_A.weight, torch.rand(m.lora_A.weight.shape, generator=gen) * 2 * bound - bound)
        _fill(m.lora_B.weight, torch.zeros(m.lora_B.weight.shape))


@contextmanager
def adapters_disabled(model: nn.Module):
    """The base model for the duration: every adapter off (a no-op for a model without adapters)."""
    modules = list(lora_modules(model))
    for m in modules:
        m.adapters_enabled = False
    try:
        yield model
    finally:
        for m in modules:
            m.adapters_enabled = True


@torch.no_grad()
def merge_adapters(model: nn.Module) -> None:
    """W += B @ A * scaling in every wrapped projection (unsharded models: export, inference)."""
    for m in lora_modules(model):
        if not m.merged:
            m.weight += m.delta().to(m.weight.dtype)
            m.merged = True


@torch.no_grad()
def unmerge_adapters(model: nn.Module) -> None:
    """Undo merge_adapters (up to rounding)."""
    for m in lora_modules(model):
        if m.merged:
            m.weight -= m.delta().to(m.weight.dtype)
            m.merged = False


def merged_weight(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """A base weight with its adapter folded in, from plain tensors (a checkpoint read offline)."""
    return (weight.float() + (lora_b.float() @ lora_a.float()) * scaling).to(weight.dtype)


def trainable_share(model: nn.Module) -> tuple[int, int]:
    """(trainable parameters, all parameters), a tied weight counted once."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total
