"""Weighted sums of metrics, averaged over every rank when read: logged numbers describe the whole job."""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist


class MetricSums:
    def __init__(self):
        self.sums: dict[str, float] = defaultdict(float)
        self.weights: dict[str, float] = defaultdict(float)

    def add(self, metrics: dict, weight: float = 1.0) -> None:
        """metrics: name -> number or 0-d tensor, each the mean over `weight` items."""
        for name, value in metrics.items():
            self.sums[name] += float(value) * weight
            self.weights[name] += weight

    def mean(self, device, world_size: int) -> dict[str, float]:
        """The weighted means over all ranks (a collective: every rank calls it), then reset.
        Every rank must have added the same metric names."""
        names = sorted(self.sums)
        if not names:
            return {}
        t = torch.tensor(
            [[self.sums[n] for n in names], [self.weights[n] for n in names]], dtype=torch.float64, device=device
        )
        if world_size > 1:
            dist.all_reduce(t)
        self.sums.clear()
        self.weights.clear()
        return {n: (t[0, i] / t[1, i]).item() if t[1, i] > 0 else None for i, n in enumerate(names)}
