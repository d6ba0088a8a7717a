"""Can the scaling-law fit be trusted? Synthetic IsoFLOP ladders drawn from a known law, fitted as
`orch sweep fit` fits (orchestrator/sweeps), and three things measured:

    python -m bench.scaling_fit                       # 200 ladders, 100 resamples: 21 min on 2 busy cores
    python -m bench.scaling_fit --ladders 20 --resamples 50   # a quick look
    python -m bench.scaling_fit --noise 0.005 0.01            # also at 1% noise (twice as long)
    python -m bench.scaling_fit --budgets 3 --sizes 4         # a small ladder (12 members, as jobs/sweep.yaml)

1. recovery: how often one ladder's Approach 3 fit lands within 5% of alpha and beta and 2% of E;
2. coverage: how often the 95% bootstrap intervals contain the true values (asked: at least 90%);
3. Approach 2's bias: its exponent a from noise-free ladders, for sizes centred on each budget's optimum, on a
   guess that drifts from it, and one fixed list of sizes shared by every budget, at several spacings.

The law is Epoch AI's refit of Chinchilla (Besiroglu et al. 2024): E = 1.82, A = 482.01, B = 2085.43,
alpha = 0.3478, beta = 0.3658. A ladder: 5 budgets 1e18..1e22 FLOPs (C = 6ND), 8 model sizes per budget from
N_opt / 8 to 8 N_opt (log-spaced), each loss multiplied by exp(noise), noise ~ Normal(0, 0.005).
Results: bench/results/scaling_fit-cpu2-DATE.json (scaling_fit_3x4-... for --budgets 3 --sizes 4); the tables
in docs/scaling.md are filled from them (`python -m bench.scaling_fit --docs` alone refills them).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from orchestrator.sweeps import approach2
from orchestrator.sweeps.approach3 import Law
from orchestrator.sweeps.bootstrap import intervals

TRUE = Law(E=1.82, A=482.01, B=2085.43, alpha=0.3478, beta=0.3658)
BUDGETS = tuple(np.logspace(18, 22, 5))
SIZES, SPAN, NOISE = 8, 8.0, 0.005
CHECKED = ("E", "A", "B", "alpha", "beta", "a", "b")  # Approach 3's parameters and its exponents of N_opt, D_opt


def ladder(
    rng: np.random.Generator,
    noise: float = NOISE,
    budgets=BUDGETS,
    sizes: int = SIZES,
    span: float = SPAN,
    fixed_sizes=None,
    centre_exponent=None,
    law: Law = TRUE,
):
    """(N, D, C, loss) of an IsoFLOP ladder: for each budget, `sizes` models log-spaced from N_opt/span to
    N_opt*span (or the given fixed_sizes for every budget), D = C / 6N, loss = law * exp(Normal(0, noise)).
    centre_exponent: centre the sizes on a guess, N_opt of the smallest budget grown as C^centre_exponent."""
    rows = []
    for C in budgets:
        n_opt, _ = law.optimal(C)
        if centre_exponent is not None:
            n_opt = law.optimal(budgets[0])[0] * (C / budgets[0]) ** centre_exponent
        for N in fixed_sizes if fixed_sizes is not None else n_opt * np.geomspace(1 / span, span, sizes):
            rows.append((N, C / (6 * N), C))
    N, D, C = (np.array(v) for v in zip(*rows))
    return N, D, C, law.loss(N, D) * np.exp(rng.normal(0.0, noise, len(N)))


def truth(name: str) -> float:
    return float(getattr(TRUE, name))


def recovered(law: Law) -> bool:
    """The issue's tolerance: alpha and beta within 5%, E within 2%."""
    return (
        abs(law.alpha / TRUE.alpha - 1) <= 0.05
        and abs(law.beta / TRUE.beta - 1) <= 0.05
        and abs(law.E / TRUE.E - 1) <= 0.02
    )


def coverage(
    ladders: int, resamples: int, noise: float = NOISE, seed: int = 0, budgets=BUDGETS, sizes: int = SIZES
) -> dict:
    """Fit `ladders` noisy ladders with bootstrap intervals; count recoveries and coverage per parameter."""
    covered = {name: 0 for name in CHECKED}
    widths = {name: [] for name in CHECKED}
    hits, errors = 0, {name: [] for name in ("E", "alpha", "beta")}
    for i in range(ladders):
        N, D, C, L = ladder(np.random.default_rng(seed + i), noise, budgets=budgets, sizes=sizes)
        law, _, iv = intervals(N, D, C, L, resamples=resamples, seed=seed + i)
        hits += recovered(law)
        for name, found in errors.items():
            found.append(abs(getattr(law, name) / truth(name) - 1))
        for name in CHECKED:
            interval = iv[f"approach3.{name}"]
            covered[name] += interval.covers(truth(name))
            widths[name].append((interval.high - interval.low) / truth(name))
    return {
        "ladders": ladders,
        "resamples": resamples,
        "noise": noise,
        "members": len(budgets) * sizes,
        "recovered": hits / ladders,
        "median_relative_error": {k: float(np.median(v)) for k, v in errors.items()},
        "coverage": {k: v / ladders for k, v in covered.items()},
        "median_relative_width": {k: float(np.median(v)) for k, v in widths.items()},
    }


def approach2_bias() -> list[dict]:
    """Approach 2's a from noise-free ladders against the law's own beta/(alpha+beta)."""
    designs = [("centred", sizes, span, None, None) for sizes, span in ((5, 2.0), (8, 8.0), (9, 64.0))]
    # centred on a guess that grows too fast (C^0.6 instead of C^0.513): off-centre more at each larger budget
    designs += [("guess C^0.6", sizes, span, None, 0.6) for sizes, span in ((5, 2.0), (8, 8.0), (9, 64.0))]
    # one list of sizes for all budgets, as a grid gives: from the smallest budget's N_opt/4 to the largest's x4
    lo, hi = TRUE.optimal(BUDGETS[0])[0] / 4, TRUE.optimal(BUDGETS[-1])[0] * 4
    designs += [("fixed list", n, None, np.geomspace(lo, hi, n), None) for n in (9, 17)]
    out = []
    for kind, sizes, span, fixed, guess in designs:
        N, D, C, L = ladder(
            np.random.default_rng(0), 0.0, sizes=sizes, span=span or SPAN, fixed_sizes=fixed, centre_exponent=guess
        )
        fit = approach2.fit(N, D, C, L)
        out.append(
            {
                "sizes": kind,
                "per_budget": sizes,
                "span": span,
                "a": fit.a,
                "a_error": fit.a - TRUE.a,
                "budgets_used": len(fit.minima),
                "minima_outside_sizes": sum(not m.inside for m in fit.minima),
            }
        )
    return out


DOC = Path(__file__).resolve().parents[1] / "docs" / "scaling.md"


def _coverage_row(label: str, fig: dict) -> str:
    cov, width = fig["coverage"], fig["median_relative_width"]
    return (
        f"| {label} | {fig['members']} | {fig['noise']:g} | {fig['ladders']} x {fig['resamples']} | "
        f"{fig['recovered']:.3f} | " + " | ".join(f"{cov[k]:.3f} ({width[k]:.1%})" for k in CHECKED) + " |"
    )


DESIGNS = (("scaling_fit", "5 budgets x 8 sizes"), ("scaling_fit_3x4", "3 budgets x 4 sizes"))


def coverage_table() -> str:
    """docs/scaling.md's coverage table, from the newest result of each ladder design in bench/results/."""
    from bench.common import newest_result

    rows = [
        "| ladder | members | noise | ladders x resamples | recovered | " + " | ".join(CHECKED) + " |",
        "| --- " * (5 + len(CHECKED)) + "|",
    ]
    for name, label in DESIGNS:
        record = newest_result(name)
        for key, fig in (record or {}).get("figures", {}).items():
            if key.startswith("noise_"):
                rows.append(_coverage_row(f"{label} ({record['device']}, {record['date']})", fig))
    rows += [
        "",
        (
            "Each cell: the share of ladders whose 95% interval covers the true value, and (in brackets) the "
            "median interval's width relative to it. Recovered: alpha and beta within 5%, E within 2%."
        ),
    ]
    return "\n".join(rows)


def bias_table() -> str:
    """docs/scaling.md's table of Approach 2's exponent on noise-free ladders (the main result's)."""
    from bench.common import newest_result

    table = [
        "| sizes per budget | span (x N_opt) | a | error in a | vertices outside the sizes |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in newest_result(DESIGNS[0][0])["figures"]["approach2_bias"]:
        span = f"1/{row['span']:g} .. {row['span']:g}" if row["span"] else "one list, all budgets"
        table.append(
            f"| {row['sizes']}, {row['per_budget']} | {span} | {row['a']:.4f} | {row['a_error']:+.4f} | "
            f"{row['minima_outside_sizes']} |"
        )
    table.append(f"\nThe law's own a = beta / (alpha + beta) = {TRUE.a:.4f}.")
    return "\n".join(table)


TABLES = (("scaling_fit", coverage_table), ("approach2_bias", bias_table))  # markers in docs/scaling.md


def write_docs() -> None:
    from bench.common import write_between_markers

    for marker, make in TABLES:
        write_between_markers(DOC, marker, make())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ladders", type=int, default=200)
    p.add_argument("--resamples", type=int, default=100)
    p.add_argument("--noise", type=float, nargs="+", default=[NOISE])
    p.add_argument("--budgets", type=int, default=len(BUDGETS), help="budgets per ladder, log-spaced 1e18..1e22")
    p.add_argument("--sizes", type=int, default=SIZES, help="model sizes per budget")
    p.add_argument("--docs", action="store_true", help="only fill docs/scaling.md's tables from bench/results/")
    args = p.parse_args()
    if args.docs:
        return write_docs()
    from bench.common import (
        write_result,  # torch, for the device's name: only when results are written
    )

    budgets = tuple(np.logspace(18, 22, args.budgets))
    figures = {"true": {**TRUE.as_dict(), "a": TRUE.a, "b": TRUE.b}, "approach2_bias": approach2_bias()}
    for noise in args.noise:
        start = time.perf_counter()
        figures[f"noise_{noise:g}"] = fig = coverage(
            args.ladders, args.resamples, noise, budgets=budgets, sizes=args.sizes
        )
        fig["seconds"] = round(time.perf_counter() - start, 1)
        print(
            f"noise {noise:g}: recovered {fig['recovered']:.3f}, coverage "
            + ", ".join(f"{k} {v:.3f}" for k, v in fig["coverage"].items())
            + f" ({fig['seconds']} s)",
            flush=True,
        )
    for row in figures["approach2_bias"]:
        print(
            f"approach 2, {row['sizes']} sizes x{row['per_budget']} span {row['span']}: "
            f"a {row['a']:.4f} (true {TRUE.a:.4f}, error {row['a_error']:+.4f})"
        )
    config = {
        "budgets": list(budgets),
        "sizes_per_budget": args.sizes,
        "span": SPAN,
        "ladders": args.ladders,
        "resamples": args.resamples,
        "noise": args.noise,
        "flops": "C = 6ND",
    }
    default = args.budgets == len(BUDGETS) and args.sizes == SIZES
    print(write_result("scaling_fit" if default else f"scaling_fit_{args.budgets}x{args.sizes}", config, figures))
    write_docs()


if __name__ == "__main__":
    main()
