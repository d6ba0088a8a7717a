"""The optimizer (`optim.name`) and its learning-rate schedule (`optim.schedule`).

adamw: AdamW on every parameter, weight decay on matrices only.
muon:  Muon on the hidden matrices (attention and MLP weights inside the blocks), AdamW on the rest
       (embeddings, output head, norm gains), as modded-nanogpt does: orthogonalized updates suit
       matrices that map one hidden space to another, not lookup tables or gains.

Both are one torch Optimizer, so checkpoints save and restore them through
torch.distributed.checkpoint's get/set_optimizer_state_dict like any other.
"""

from __future__ import annotations

import math

import torch

# torch.optim.Muon's own Newton-Schulz iteration and its defaults (5 steps, in bf16)
from torch.optim._muon import DEFAULT_A, DEFAULT_B, DEFAULT_C, DEFAULT_NS_STEPS, EPS, _zeropower_via_newtonschulz
from torch.optim.adamw import adamw


def build_optimizer(model: torch.nn.Module, cfg, device: torch.device) -> torch.optim.Optimizer:
    """Weight decay on matrices only: decaying norm gains and biases only hurts."""
    muon, decay, no_decay = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if cfg.name == "muon" and is_hidden_matrix(name, p):
            muon.append(p)
        else:
            (decay if p.ndim >= 2 else no_decay).append(p)
    adamw_groups = [
        {"params": decay, "weight_decay": cfg.weight_decay, "base_lr": cfg.lr},
        {"params": no_decay, "weight_decay": 0.0, "base_lr": cfg.lr},
    ]
    if cfg.name == "muon":
        muon_group = {
            "params": muon,
            "muon": True,
            "lr": cfg.muon_lr,
            "base_lr": cfg.muon_lr,
            "weight_decay": cfg.muon_weight_decay,
            "momentum": cfg.muon_momentum,
        }
        return MuonAdamW([muon_group, *adamw_groups], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    # One fused kernel per parameter (CPU and CUDA both have one) reads and writes each tensor once,
    # instead of once per elementwise op of the foreach path (docs/performance.md).
    return torch.optim.AdamW(adamw_groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=True)


def is_hidden_matrix(name: str, p: torch.Tensor) -> bool:
    """A 2-D weight inside a transformer block: what Muon updates. Embeddings and the head are not."""
    return p.ndim == 2 and name.startswith("layers.")


class MuonAdamW(torch.optim.Optimizer):
    """Muon for the param groups marked {"muon": True}, AdamW (torch's functional form) for the others.

    Muon's step is torch.optim.Muon's (Nesterov momentum, Newton-Schulz orthogonalization, decoupled
    weight decay, the lr scaled by sqrt(max(1, rows/cols))), with one difference: the orthogonalization
    needs the whole matrix. Matrices sharded by FSDP2 (HSDP too) are shared out among the shard group's
    ranks: each rank gathers and orthogonalizes 1/N of them and sends each owner's result back in shards,
    two all-to-alls per N matrices (orthogonalize_all). Under tensor parallelism every rank gathers each
    matrix and orthogonalizes it whole. Exact either way: the same bf16 matrices as in one process.
    """

    def __init__(self, groups: list[dict], *, lr: float, betas: tuple[float, float], eps: float):
        # fused: what Optimizer.load_state_dict reads to put AdamW's step counts beside their parameters
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": 0.0,
            "muon": False,
            "momentum": 0.95,
            "fused": True,
        }
        super().__init__(groups, defaults)
        for group in self.param_groups:
            if group["muon"] and any(p.ndim != 2 for p in group["params"]):
                raise ValueError("Muon updates 2-D matrices only")

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if group["muon"]:
                self._muon_step(group, params)
            else:
                self._adamw_step(group, params)

    def _muon_step(self, group: dict, params: list[torch.Tensor]) -> None:
        lr, momentum = group["lr"], group["momentum"]
        updates = []
        for p in params:
            state = self.state[p]
            if not state:
                state["momentum_buffer"] = torch.zeros_like(p)
            buf = state["momentum_buffer"]
            buf.lerp_(p.grad, 1 - momentum)
            updates.append(p.grad.lerp(buf, momentum))  # Nesterov
        for p, update in zip(params, orthogonalize_all(updates)):
            p.mul_(1 - lr * group["weight_decay"])
            p.add_(update, alpha=-lr * math.sqrt(max(1.0, p.shape[0] / p.shape[1])))

    def _adamw_step(self, group: dict, params: list[torch.Tensor]) -> None:
        for p in params:
            state = self.state[p]
            if not state:  # fused AdamW's own state layout: checkpoints read like torch.optim.AdamW's
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
        states = [self.state[p] for p in params]
        beta1, beta2 = group["betas"]
        adamw(
            params,
            [p.grad for p in params],
            [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states],
            [],
            [s["step"] for s in states],
            fused=True,
            amsgrad=False,
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=False,
        )


NS = dict(ns_coefficients=(DEFAULT_A, DEFAULT_B, DEFAULT_C), ns_steps=DEFAULT_NS_STEPS, eps=EPS)


def orthogonalize_all(updates: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each update orthogonalized (torch.optim.Muon's Newton-Schulz on the whole matrix), in the same layout.
    Updates sharded along rows over one mesh dimension (FSDP2's Shard(0); replicated over the others, as under
    HSDP) share that dimension's work out (training/muon_shards.py); the rest go one by one."""
    from training.muon_shards import orthogonalize_sharded, row_shard_dim

    out: list[torch.Tensor | None] = [None] * len(updates)
    by_group: dict[tuple, list[int]] = {}
    for i, u in enumerate(updates):
        dim = row_shard_dim(u)
        if dim is None:
            out[i] = orthogonalize(u)
        else:
            by_group.setdefault((id(u.device_mesh), dim), []).append(i)
    for indices in by_group.values():
        for i, result in zip(indices, orthogonalize_sharded([updates[i] for i in indices], newton_schulz)):
            out[i] = result
    return out


def newton_schulz(matrix: torch.Tensor) -> torch.Tensor:
    """torch.optim.Muon's iteration: bf16 in (it casts first), bf16 out."""
    return _zeropower_via_newtonschulz(matrix, **NS)


def orthogonalize(update: torch.Tensor) -> torch.Tensor:
    """torch.optim.Muon's orthogonalization of the full matrix."""
    ns = NS
    if not hasattr(update, "full_tensor"):
        return _zeropower_via_newtonschulz(update, **ns).to(update.dtype)
    from torch.distributed.tensor import distribute_tensor

    full = _zeropower_via_newtonschulz(update.full_tensor(), **ns).to(update.dtype)
    # Every rank computed the same full matrix: each keeps its own shard, no communication.
    return distribute_tensor(full, update.device_mesh, update.placements, src_data_rank=None)


def lr_scale(step: int, cfg, max_steps: int) -> float:
    """The schedule's factor on each param group's base LR at optimizer step `step` (0-based).

    Linear warm-up over optim.warmup_steps, then
      cosine: cosine decay to optim.min_lr_ratio at max_steps;
      wsd:    warmup-stable-decay: constant, then linear decay to min_lr_ratio over the last
              optim.decay_fraction of max_steps. Before the decay starts the factor does not
              depend on max_steps, so a run resumed from a checkpoint of its stable phase with a
              larger train.max_steps continues as if it had been planned that long (docs/recipe.md).
    A pure function of the step: a resumed run needs no scheduler state to continue exactly.
    """
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    floor = cfg.min_lr_ratio
    if cfg.schedule == "wsd":
        decay_steps = max(1, round(cfg.decay_fraction * max_steps))
        progress = min(1.0, max(0.0, (step - (max_steps - decay_steps)) / decay_steps))
        return 1.0 - (1.0 - floor) * progress
    span = max(1, max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_at(step: int, cfg, max_steps: int) -> float:
    """optim.lr (AdamW's) at step `step`: what the metrics log."""
    return cfg.lr * lr_scale(step, cfg, max_steps)


def set_lr(optimizer: torch.optim.Optimizer, step: int, cfg, max_steps: int) -> None:
    """Set every param group's LR for step `step`: its base LR (optim.lr, or optim.muon_lr) times the schedule."""
    scale = lr_scale(step, cfg, max_steps)
    for group in optimizer.param_groups:
        group["lr"] = group.get("base_lr", cfg.lr) * scale
