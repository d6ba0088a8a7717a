"""Chinchilla's Approach 2: a parabola per IsoFLOP curve, then power laws through the curves' minima.

For each budget C with at least three model sizes, loss is fitted as a parabola in log N; its vertex is the
budget's N_opt, and D_opt is read at the vertex from the members' own log D against log N (a line: exact for
C = 6ND, and for a FLOP count with attention to within the line's fit). Then N_opt(C) = G C^a and
D_opt(C) = H C^b by least squares in logs. A budget whose parabola opens downwards has no minimum and is
left out, with the reason. The parabola is not the law's true shape (docs/scaling.md: when its bias matters).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Minimum:
    C: float
    N_opt: float
    D_opt: float
    loss: float  # the parabola's value at its vertex
    sizes: int  # distinct model sizes on this curve
    inside: bool  # the vertex lies between the curve's smallest and largest model


@dataclass
class Approach2:
    minima: list[Minimum]
    skipped: dict[float, str] = field(default_factory=dict)  # budget -> why it has no minimum
    G: float | None = None
    a: float | None = None
    H: float | None = None
    b: float | None = None

    def optimal(self, C):
        """(N_opt, D_opt) for budget(s) C from the power laws."""
        C = np.asarray(C, float)
        return self.G * C**self.a, self.H * C**self.b


def curve_minimum(N, D, L, C: float, weights=None) -> Minimum:
    """The vertex of the parabola loss(log N) on one IsoFLOP curve; ValueError when it has none."""
    x, y, logD = np.log(np.asarray(N, float)), np.asarray(L, float), np.log(np.asarray(D, float))
    w = np.ones_like(x) if weights is None else np.asarray(weights, float)
    keep = w > 0
    x, y, logD, w = x[keep], y[keep], logD[keep], w[keep]
    sizes = len(np.unique(x))
    if sizes < 3:
        raise ValueError(f"{sizes} model size(s): a parabola needs 3")
    p2, p1, p0 = np.polyfit(x, y, 2, w=np.sqrt(w))
    if p2 <= 0:
        raise ValueError("the loss is not convex in log N here (the parabola opens downwards): no minimum")
    xv = -p1 / (2 * p2)
    d1, d0 = np.polyfit(x, logD, 1, w=np.sqrt(w))
    return Minimum(
        C=float(C),
        N_opt=float(np.exp(xv)),
        D_opt=float(np.exp(d0 + d1 * xv)),
        loss=float(p0 + p1 * xv + p2 * xv * xv),
        sizes=sizes,
        inside=bool(x.min() <= xv <= x.max()),
    )


def fit(N, D, C, L, weights=None) -> Approach2:
    """Minima of every IsoFLOP curve (members grouped by their budget C), then the power laws through them
    (when at least two curves have a minimum)."""
    N, D, C, L = (np.asarray(v, float) for v in (N, D, C, L))
    w = np.ones_like(N) if weights is None else np.asarray(weights, float)
    result = Approach2(minima=[])
    for budget in np.unique(C):
        on = C == budget
        try:
            result.minima.append(curve_minimum(N[on], D[on], L[on], budget, w[on]))
        except ValueError as e:
            result.skipped[float(budget)] = str(e)
    if len(result.minima) >= 2:
        logC = np.log([m.C for m in result.minima])
        result.a, logG = np.polyfit(logC, np.log([m.N_opt for m in result.minima]), 1)
        result.b, logH = np.polyfit(logC, np.log([m.D_opt for m in result.minima]), 1)
        result.a, result.b = float(result.a), float(result.b)
        result.G, result.H = float(np.exp(logG)), float(np.exp(logH))
    return result
