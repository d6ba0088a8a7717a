"""Chinchilla's Approach 3, as Besiroglu et al. (2024) refitted it: L(N, D) = E + A / N^alpha + B / D^beta.

The parameters are fitted in logs, theta = (a, b, e, alpha, beta) with A = exp(a), B = exp(b), E = exp(e), by
minimizing the Huber loss (delta = 1e-3) between log L_hat = LSE(a - alpha log N, b - beta log D, e) and log L
over the members, with L-BFGS. Starts: Hoffmann et al.'s grid (alpha, beta in 0..2 by 0.5, e in -1..1 by 0.5,
a, b in 0..25 by 5: 4,500 points) is evaluated in full, and L-BFGS runs from its best `starts` points (every
start from the whole grid costs ~1,000x more and, on the ladders of bench/scaling_fit.py, finds the same
optimum); the best end is kept. The objective is divided by delta, which changes no minimizer but keeps
L-BFGS's tolerances meaningful (the raw values are ~1e-6).
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize
from threadpoolctl import threadpool_limits

HUBER_DELTA = 1e-3
NAMES = ("E", "A", "B", "alpha", "beta")
GRID = np.array(
    list(
        itertools.product(
            np.arange(0, 30, 5.0),  # a = log A
            np.arange(0, 30, 5.0),  # b = log B
            np.arange(-1, 1.5, 0.5),  # e = log E
            np.arange(0, 2.5, 0.5),  # alpha
            np.arange(0, 2.5, 0.5),  # beta
        )
    )
)


@dataclass
class Law:
    E: float
    A: float
    B: float
    alpha: float
    beta: float

    def loss(self, N, D):
        return self.E + self.A / np.asarray(N, float) ** self.alpha + self.B / np.asarray(D, float) ** self.beta

    @property
    def a(self) -> float:
        """N_opt grows as C^a when C = 6ND is spent best."""
        return self.beta / (self.alpha + self.beta)

    @property
    def b(self) -> float:
        return self.alpha / (self.alpha + self.beta)

    def optimal(self, C, flops_per_param_token: float = 6.0):
        """(N_opt, D_opt) for the budget C = k N D (k = 6): where dL/dN = 0 along the budget's curve. NaN when
        the law has no such point (an exponent <= 0: loss does not fall with N or with D)."""
        ND = np.asarray(C, float) / flops_per_param_token
        if not (self.alpha > 0 and self.beta > 0):
            return np.full_like(ND, np.nan), np.full_like(ND, np.nan)
        G = (self.alpha * self.A / (self.beta * self.B)) ** (1 / (self.alpha + self.beta))
        return G * ND**self.a, ND**self.b / G

    def as_dict(self) -> dict:
        return {name: float(getattr(self, name)) for name in NAMES}


def _lse3(t1, t2, t3):
    """log(exp t1 + exp t2 + exp t3) and the three softmax weights, elementwise (no overflow)."""
    m = np.maximum(np.maximum(t1, t2), t3)
    e1, e2, e3 = np.exp(t1 - m), np.exp(t2 - m), np.exp(t3 - m)
    s = e1 + e2 + e3
    return m + np.log(s), e1 / s, e2 / s, e3 / s


def _huber(r: np.ndarray, delta: float) -> np.ndarray:
    """Huber's loss divided by delta: r^2 / (2 delta) inside, |r| - delta / 2 outside."""
    ar = np.abs(r)
    return np.where(ar <= delta, 0.5 * r * r / delta, ar - 0.5 * delta)


def objective(theta: np.ndarray, logN, logD, logL, weights=None, delta: float = HUBER_DELTA):
    """The summed Huber loss and its gradient in theta (weights: how often each member is counted)."""
    a, b, e, alpha, beta = theta
    lse, s1, s2, s3 = _lse3(a - alpha * logN, b - beta * logD, np.full_like(logN, e))
    r = lse - logL
    dr = np.clip(r / delta, -1.0, 1.0)  # d huber / d r (divided by delta)
    h = _huber(r, delta)
    if weights is not None:
        dr, h = dr * weights, h * weights
    g1, g2 = dr @ s1, dr @ s2
    grad = np.array([g1, g2, dr @ s3, -(dr * s1) @ logN, -(dr * s2) @ logD])
    return float(h.sum()), grad


def grid_values(logN, logD, logL, weights=None, delta: float = HUBER_DELTA) -> np.ndarray:
    """The objective at every point of GRID, at once."""
    a, b, e, alpha, beta = (GRID[:, i, None] for i in range(5))
    lse = _lse3(a - alpha * logN, b - beta * logD, np.broadcast_to(e, (len(GRID), len(logN))))[0]
    h = _huber(lse - logL, delta)
    return h.sum(axis=1) if weights is None else h @ weights


def fit(
    N: Sequence[float],
    D: Sequence[float],
    L: Sequence[float],
    weights=None,
    starts: int = 8,
    extra_starts: Sequence[np.ndarray] | None = None,
    delta: float = HUBER_DELTA,
    limit_threads: bool = True,
) -> Law:
    """The law minimizing the Huber loss over the members (N parameters, D tokens, final loss L), from the
    grid's best `starts` points and any `extra_starts`. limit_threads=False: the caller already holds BLAS to
    one thread (it costs ~2 ms to set)."""
    logN, logD, logL = np.log(np.asarray(N, float)), np.log(np.asarray(D, float)), np.log(np.asarray(L, float))
    if len(logL) < 5:
        raise ValueError(f"Approach 3 fits 5 parameters: it needs at least 5 members, not {len(logL)}.")
    ranked = np.argsort(grid_values(logN, logD, logL, weights, delta))[:starts] if starts else []
    candidates = [GRID[i] for i in ranked] + [np.asarray(x, float) for x in (extra_starts or ())]
    best = None
    with threadpool_limits(1) if limit_threads else contextlib.nullcontext():  # threads slow L-BFGS 10-30x here
        for x0 in candidates:
            res = minimize(
                objective,
                x0,
                args=(logN, logD, logL, weights, delta),
                jac=True,
                method="L-BFGS-B",
                options={"maxiter": 2000, "ftol": 1e-12, "gtol": 1e-10},
            )
            if best is None or res.fun < best.fun:
                best = res
    a, b, e, alpha, beta = best.x
    return Law(E=float(np.exp(e)), A=float(np.exp(a)), B=float(np.exp(b)), alpha=float(alpha), beta=float(beta))


def theta(law: Law) -> np.ndarray:
    """The law as the optimizer's vector, to start another fit from it."""
    return np.array([np.log(law.A), np.log(law.B), np.log(law.E), law.alpha, law.beta])
