"""report.md for a fit (fit.json's content): the parameters with their intervals, the compute-optimal sizes,
and two plots: loss against N for each budget with both approaches' curves and the IsoFLOP minima, and N_opt
against C with the published exponents drawn beside ours."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from orchestrator.sweeps import REPORT
from orchestrator.sweeps.approach3 import Law

# N_opt ~ C^a as published, drawn through our fit's N_opt at the middle budget to compare slopes only.
PUBLISHED_A = {
    "Kaplan et al. 2020 (a = 0.73)": 0.73,
    "Hoffmann et al. 2022, Approach 2 (a = 0.49)": 0.49,
    "Besiroglu et al. 2024, Approach 3 refit (a = 0.51)": 0.3658 / (0.3478 + 0.3658),
}


def _fmt(entry) -> str:
    if not entry:
        return "n/a"
    lo, hi = entry["ci95"]
    return f"{entry['value']:.4g} [{lo:.4g}, {hi:.4g}]"


def _groups(members: list[dict]) -> dict[float, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    out = {}
    for C in sorted({m["C"] for m in members}):
        on = [m for m in members if m["C"] == C]
        out[C] = tuple(np.array([m[k] for m in on]) for k in ("N", "D", "loss"))
    return out


def _plots(fit: dict, folder: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    law = Law(**{k: fit[k]["value"] for k in ("E", "A", "B", "alpha", "beta")})
    groups = _groups(fit["members"])
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(groups)))
    minima = {m["C"]: m for m in fit["approach2"]["minima"]}

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for color, (C, (N, D, L)) in zip(colors, groups.items()):
        ax.scatter(N, L, color=color, s=14, label=f"C = {C:.2g}")
        grid = np.geomspace(N.min() / 1.5, N.max() * 1.5, 100)
        if len(N) >= 2:  # the members' D against N on this budget (C = kND: a line in logs)
            d1, d0 = np.polyfit(np.log(N), np.log(D), 1)
            ax.plot(grid, law.loss(grid, np.exp(d0 + d1 * np.log(grid))), color=color, lw=1)
        if C in minima:
            m = minima[C]
            ax.scatter([m["N_opt"]], [m["loss"]], color=color, marker="*", s=80, edgecolor="black", zorder=3)
    ax.set_xscale("log")
    ax.set_xlabel("parameters N")
    ax.set_ylabel("final validation loss (nats/token)")
    ax.set_title("IsoFLOP curves: lines Approach 3's law, stars Approach 2's minima")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(folder / "isoflop.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    budgets = np.array(sorted(groups))
    span = np.geomspace(budgets.min() / 3, budgets.max() * 3, 50)
    ax.scatter(
        [m["N_opt"] for m in minima.values()],
        [m["C"] for m in minima.values()],
        color="black",
        label="IsoFLOP minima (Approach 2)",
        zorder=3,
    )
    n3 = law.optimal(span)[0]
    ax.plot(n3, span, label=f"Approach 3: a = {law.a:.3f}")
    a2 = fit["approach2"]
    if a2["a"]:
        ax.plot(a2["G"]["value"] * span ** a2["a"]["value"], span, label=f"Approach 2: a = {a2['a']['value']:.3f}")
    mid = float(np.exp(np.mean(np.log(budgets))))
    anchor = law.optimal(mid)[0]
    for name, a in PUBLISHED_A.items():
        ax.plot(anchor * (span / mid) ** a, span, ls="--", lw=0.8, label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("compute-optimal parameters N_opt")
    ax.set_ylabel("budget C (FLOPs)")
    ax.set_title("N_opt against C (dashed: published exponents, through our N_opt at the middle budget)")
    ax.title.set_fontsize(8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(folder / "n_opt.png", dpi=120)
    plt.close(fig)
    return ["isoflop.png", "n_opt.png"]


def write_report(fit: dict, folder: Path, plots: bool = True) -> Path:
    boot = fit["bootstrap"]
    lines = [
        "# Scaling-law fit",
        "",
        (
            f"{len(fit['members'])} members; 95% intervals from {boot['resamples']} bootstrap resamples "
            f"({boot['resampled']}). docs/scaling.md says how to read them."
        ),
        "",
        "| parameter | value [95% interval] |",
        "| --- | --- |",
    ]
    for name in ("E", "A", "B", "alpha", "beta"):
        lines.append(f"| {name} (Approach 3) | {_fmt(fit[name])} |")
    for name in ("a", "b"):
        lines.append(f"| {name} (Approach 2) | {_fmt(fit['approach2'][name])} |")
        lines.append(
            f"| {name} (Approach 3: {'beta' if name == 'a' else 'alpha'} / (alpha + beta)) | "
            f"{_fmt(fit['approach3'][name])} |"
        )
    if fit["compute_optimal"]:
        lines += [
            "",
            "## Compute-optimal sizes",
            "",
            "| C (FLOPs) | N_opt (Approach 3) | D_opt (Approach 3) | N_opt (Approach 2) | D_opt (Approach 2) |",
            "| --- | --- | --- | --- | --- |",
        ]
        for row in fit["compute_optimal"]:
            lines.append(
                f"| {row['C']:.3g} | {_fmt(row['approach3']['N'])} | {_fmt(row['approach3']['D'])} | "
                f"{_fmt(row['approach2']['N'])} | {_fmt(row['approach2']['D'])} |"
            )
    lines += [
        "",
        "## IsoFLOP minima (Approach 2)",
        "",
        "| C | N_opt | D_opt | loss | sizes | inside the sizes |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for m in fit["approach2"]["minima"]:
        lines.append(
            f"| {m['C']:.3g} | {m['N_opt']:.4g} | {m['D_opt']:.4g} | {m['loss']:.4f} | {m['sizes']} | "
            f"{'yes' if m['inside'] else 'no: extrapolated, plan larger or smaller models'} |"
        )
    for C, why in fit["approach2"]["skipped"].items():
        lines.append(f"| {C} | - | - | - | - | left out: {why} |")
    if plots:
        try:
            names = _plots(fit, folder)
            lines += ["", "## Plots", ""] + [f"![{n}]({n})" for n in names]
        except ImportError:
            lines += ["", "(No plots: matplotlib is not installed; `pip install matplotlib`.)"]
    lines += ["", "## Members", "", "| member | N | D | C | loss |", "| --- | --- | --- | --- | --- |"]
    for m in fit["members"]:
        lines.append(f"| {m.get('member', '-')} | {m['N']:.4g} | {m['D']:.4g} | {m['C']:.3g} | {m['loss']:.4f} |")
    path = folder / REPORT
    path.write_text("\n".join(lines) + "\n")
    return path
