"""Bootstrap intervals for both approaches: members are resampled with replacement within each budget (every
IsoFLOP curve keeps its number of members), both approaches are refitted on each resample, and an interval is
the 2.5th and 97.5th percentiles of a quantity over the resamples (a percentile bootstrap).

A resample's Approach 3 fit starts from the full fit's optimum only: the grid has already chosen the basin, a
resample's data lie near the full data's, and one start instead of the grid's eight makes the 200-ladder
coverage measurement (bench/scaling_fit.py) a few minutes. A resample whose IsoFLOP curves keep fewer than two
minima gives Approach 2 nothing; the count of resamples behind each interval is kept.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
from threadpoolctl import threadpool_limits

from orchestrator.sweeps import approach2, approach3

LEVEL = 0.95


@dataclass
class Interval:
    value: float  # the full data's estimate
    low: float
    high: float
    resamples: int  # how many resamples gave this quantity

    def covers(self, x: float) -> bool:
        return self.low <= x <= self.high

    def as_dict(self) -> dict:
        return {"value": self.value, "ci95": [self.low, self.high], "resamples": self.resamples}


def resample_weights(C: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """How many times each member is drawn: len(group) draws with replacement within each budget's group."""
    w = np.zeros(len(C))
    for budget in np.unique(C):
        idx = np.flatnonzero(C == budget)
        np.add.at(w, rng.choice(idx, size=len(idx), replace=True), 1.0)
    return w


def quantities(law: approach3.Law, a2: approach2.Approach2, budgets) -> dict[str, float]:
    """Every quantity that gets an interval, from one fit of both approaches."""
    out = {f"approach3.{k}": v for k, v in law.as_dict().items()}
    out["approach3.a"], out["approach3.b"] = law.a, law.b
    for C in budgets:
        n, d = law.optimal(C)
        out[f"approach3.N_opt@{C:g}"], out[f"approach3.D_opt@{C:g}"] = float(n), float(d)
    if a2.a is not None:
        out.update({"approach2.a": a2.a, "approach2.b": a2.b, "approach2.G": a2.G, "approach2.H": a2.H})
        for C in budgets:
            n, d = a2.optimal(C)
            out[f"approach2.N_opt@{C:g}"], out[f"approach2.D_opt@{C:g}"] = float(n), float(d)
    return out


def intervals(N, D, C, L, budgets=(), resamples: int = 200, seed: int = 0, starts: int = 8):
    """(law, approach 2's fit, {quantity: Interval}) for members with N parameters, D tokens, budget C, loss L."""
    N, D, C, L = (np.asarray(v, float) for v in (N, D, C, L))
    law = approach3.fit(N, D, L, starts=starts)
    a2 = approach2.fit(N, D, C, L)
    full = quantities(law, a2, budgets)
    samples: dict[str, list[float]] = defaultdict(list)
    rng = np.random.default_rng(seed)
    x0 = approach3.theta(law)
    with threadpool_limits(1):
        for _ in range(resamples):
            w = resample_weights(C, rng)
            q = quantities(
                approach3.fit(N, D, L, weights=w, starts=0, extra_starts=[x0], limit_threads=False),
                approach2.fit(N, D, C, L, weights=w),
                budgets,
            )
            for k, v in q.items():
                samples[k].append(v)
    tail = 100 * (1 - LEVEL) / 2
    out = {}
    for k, v in full.items():
        s = np.asarray(samples.get(k, []))
        s = s[np.isfinite(s)]
        low, high = np.percentile(s, [tail, 100 - tail]) if len(s) else (np.nan, np.nan)
        out[k] = Interval(float(v), float(low), float(high), len(s))
    return law, a2, out
