"""LoRA, low-rank adapters (Hu et al. 2021): train a small update B @ A beside each chosen projection,
the base weights frozen.

    y = x W^T + dropout(x) A^T B^T * (alpha / rank)        A [rank, in], B [out, rank], B = 0 at the start

    use_rslora  the scale is alpha / sqrt(rank) (rsLoRA, Kalajdzievski 2023): the update's size no longer
                shrinks as the rank grows
    use_dora    the weight is a direction times a trained magnitude per output row (DoRA, Liu et al. 2024):
                W' = m * (W + s B A) / ||W + s B A||, the norm over each row, treated as a constant in the
                gradient as the paper and PEFT do. We train m as a factor of the base's row norms
                (lora_magnitude, 1 at the start), so it needs no base weight to initialize; PEFT's
                lora_magnitude_vector is lora_magnitude * ||W|| (training/peft_export.py)

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

    def __init__(
        self,
        base: nn.Linear,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        use_dora: bool = False,
    ):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias  # frozen with the weight; a merge leaves it as it is
        device, dtype = base.weight.device, base.weight.dtype
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, device=device, dtype=dtype)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.rank, self.alpha, self.scaling = rank, alpha, lora_scaling(rank, alpha, use_rslora)
        self.lora_magnitude = nn.Parameter(torch.ones(self.out_features, device=device)) if use_dora else None
        self.unmerged_weight = None  # DoRA's merge is not undone by a subtraction: the base is kept
        self.adapters_enabled = True
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        if not self.adapters_enabled or self.merged:
            return out
        dropped = self.lora_dropout(x)
        update = self.lora_B(self.lora_A(dropped)) * self.scaling
        if self.lora_magnitude is None:
            return out + update
        # DoRA as PEFT computes it: (m / ||W + dW|| - 1) x W^T + m / ||W + dW|| x dW^T, the norm a constant
        scale = self.dora_scale().to(out.dtype)
        base = (
            out if isinstance(self.lora_dropout, nn.Identity) and self.bias is None else F.linear(dropped, self.weight)
        )
        return out + (scale - 1) * base + scale * update

    def dora_scale(self) -> torch.Tensor:
        """m / ||W + s B A|| per output row [out], detached norm; m = lora_magnitude * ||W||."""
        weight = self.weight.detach().float()
        norm = (weight + self.delta().detach().float()).norm(dim=1)
        return self.lora_magnitude.float() * weight.norm(dim=1) / norm

    def delta(self) -> torch.Tensor:
        """The update B @ A * scaling, in the weight's shape [out, in]."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, alpha={self.alpha}"


def lora_scaling(rank: int, alpha: float, use_rslora: bool = False) -> float:
    """What the update B @ A is multiplied by: alpha / rank, or rsLoRA's alpha / sqrt(rank)."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


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
    use_rslora: bool = False,
    use_dora: bool = False,
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
        setattr(modules[parent_name], child, LoRALinear(modules[name], rank, alpha, dropout, use_rslora, use_dora))
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


@torch.no_grad()
def init_lora_weights(model: nn.Module, seed: Optional[int] = None) -> None:
    """PEFT's default start: A ~ U(-1/sqrt(in), 1/sqrt(in)) (kaiming-uniform, a=sqrt(5)), B = 0,
    so the wrapped model starts as its base. Works on DTensor shards."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    for m in lora_modules(model):
        bound = 1.0 / math.sqrt(m.in_features)
        _fill(m.lora_A.weight, torch.rand(m.lora_A.weight.shape, generator=gen) * 2 * bound - bound)
        _fill(m.lora_B.weight, torch.zeros(m.lora_B.weight.shape))
        if m.lora_magnitude is not None:
            _fill(m.lora_magnitude, torch.ones(m.lora_magnitude.shape))


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
    """W += B @ A * scaling in every wrapped projection (unsharded models: export, inference); with DoRA,
    W = m (W + B A s) / ||W + B A s||."""
    for m in lora_modules(model):
        if not m.merged:
            if m.lora_magnitude is not None:
                m.unmerged_weight = m.weight.detach().clone()
                m.weight.copy_(dora_weight(m.weight, m.delta(), m.lora_magnitude).to(m.weight.dtype))
            else:
                m.weight += m.delta().to(m.weight.dtype)
            m.merged = True


@torch.no_grad()
def unmerge_adapters(model: nn.Module) -> None:
    """Undo merge_adapters (up to rounding)."""
    for m in lora_modules(model):
        if m.merged:
            if m.unmerged_weight is not None:
                m.weight.copy_(m.unmerged_weight)
                m.unmerged_weight = None
            else:
                m.weight -= m.delta().to(m.weight.dtype)
            m.merged = False


def dora_weight(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """DoRA's merged weight m (W + dW) / ||W + dW||, m = magnitude * ||W|| (rows), in float32."""
    weight, full = weight.float(), weight.float() + delta.float()
    return full * (magnitude.float() * weight.norm(dim=1) / full.norm(dim=1)).unsqueeze(1)


def merged_weight(
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    magnitude: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """A base weight with its adapter folded in, from plain tensors (a checkpoint read offline); magnitude:
    DoRA's lora_magnitude."""
    delta = (lora_b.float() @ lora_a.float()) * scaling
    if magnitude is not None:
        return dora_weight(weight, delta, magnitude).to(weight.dtype)
    return (weight.float() + delta).to(weight.dtype)


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
