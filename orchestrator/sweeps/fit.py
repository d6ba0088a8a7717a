"""`orch sweep fit SWEEP_DIR_OR_ROWS`: the members' (N, D, C, loss) rows in, fit.json and report.md out.

Rows come from a sweep folder (its sweep.json names the members; each finished member's summary.json gives
its final validation loss and the tokens it saw) or from a file: a .json list of objects (or any JSON with a
"members" list, fit.json included), .jsonl, or .csv with a header, each row with N (parameters), D (tokens),
C (the budget it belongs to, FLOPs) and loss. fit.json holds both approaches with 95% bootstrap intervals:

    E, A, B, alpha, beta       Approach 3's law L(N, D) = E + A / N^alpha + B / D^beta
    a, b                       Approach 2's exponents of N_opt = G C^a and D_opt = H C^b (Approach 3's
                               beta/(alpha+beta) and alpha/(alpha+beta) when no two IsoFLOP curves have a minimum;
                               a_b_from says which)
    approach3, approach2       each approach's full set (Approach 3's implied a, b; Approach 2's G, H and minima)
    compute_optimal            N_opt and D_opt for each requested budget, by both approaches
    members                    the rows fitted
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jobspec import atomic
from orchestrator.sweeps import FIT, SWEEP_PLAN, bootstrap

ROW_KEYS = ("N", "D", "C", "loss")


def _check_row(row, where: str) -> dict:
    if not isinstance(row, dict):  # ValueError, not TypeError: the CLI turns it into one paragraph and exit 2
        keys = ", ".join(ROW_KEYS)
        raise ValueError(f"{where}: a row must be an object with keys {keys}, not {row!r}.")  # noqa: TRY004
    out = {k: v for k, v in row.items() if k not in ROW_KEYS}
    for key in ROW_KEYS:
        value = row.get(key)
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = math.nan
        if not (math.isfinite(number) and number > 0):
            raise ValueError(
                f"{where}: key '{key}' has the value {value!r}, but it must be a positive number "
                f"(N parameters, D tokens, C FLOPs, loss in nats)."
            )
        out[key] = number
    return out


def read_rows(path: str | Path) -> list[dict]:
    """The rows of a rows file, each checked; ValueError naming the file, row and key otherwise."""
    path = Path(path)
    text = path.read_text()
    if path.suffix == ".csv":
        raw = list(csv.DictReader(text.splitlines()))
    elif path.suffix == ".jsonl":
        raw = [json.loads(line) for line in text.splitlines() if line.strip()]
    else:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not JSON ({e}); rows are a .json list, .jsonl or .csv.") from None
        raw = raw.get("members") if isinstance(raw, dict) else raw
        if not isinstance(raw, list):
            raise ValueError(f"{path}: expected a list of rows (or an object with a 'members' list).")
    return [_check_row(row, f"{path}, row {i}") for i, row in enumerate(raw)]


def collect_rows(sweep_dir: str | Path) -> tuple[list[dict], list[str]]:
    """Rows of a sweep folder's finished members, and the ids of those without a final loss yet."""
    plan = json.loads((Path(sweep_dir) / SWEEP_PLAN).read_text())
    rows, missing = [], []
    for member in plan["members"]:
        summary = Path(member["run_dir"]) / "summary.json"
        if not summary.exists():
            missing.append(member["id"])
            continue
        s = json.loads(summary.read_text())
        rows.append(
            _check_row(
                {
                    "member": member["id"],
                    "N": member["N"],
                    "D": s.get("tokens_seen", member["D"]),
                    "C": member["C"],
                    "loss": s.get("val_loss"),
                },
                f"{summary}",
            )
        )
    return rows, missing


def fit_rows(rows: Sequence[dict], budgets: Sequence[float] = (), resamples: int = 200, seed: int = 0) -> dict:
    """fit.json's content for these rows (see the module's docstring)."""
    if len(rows) < 5:
        raise ValueError(
            f"{len(rows)} member(s) have a final loss: the fit needs at least 5 (Approach 3 has 5 "
            "parameters), and Approach 2 needs two budgets of at least 3 sizes each."
        )
    N, D, C, L = (np.array([r[k] for r in rows]) for k in ROW_KEYS)
    budgets = [float(b) for b in budgets]
    _, a2, iv = bootstrap.intervals(N, D, C, L, budgets, resamples=resamples, seed=seed)

    def get(key):
        return iv[key].as_dict() if key in iv else None

    out = {name: get(f"approach3.{name}") for name in ("E", "A", "B", "alpha", "beta")}
    source = "approach2" if "approach2.a" in iv else "approach3"  # a grid plan has no IsoFLOP curves
    out["a"], out["b"], out["a_b_from"] = get(f"{source}.a"), get(f"{source}.b"), source
    out["approach3"] = {name: get(f"approach3.{name}") for name in ("E", "A", "B", "alpha", "beta", "a", "b")}
    out["approach2"] = {
        **{name: get(f"approach2.{name}") for name in ("a", "b", "G", "H")},
        "minima": [vars(m) for m in a2.minima],
        "skipped": {f"{c:g}": why for c, why in a2.skipped.items()},
    }
    out["compute_optimal"] = [
        {
            "C": C_,
            **{
                f"{approach}": {"N": get(f"{approach}.N_opt@{C_:g}"), "D": get(f"{approach}.D_opt@{C_:g}")}
                for approach in ("approach3", "approach2")
            },
        }
        for C_ in budgets
    ]
    out["bootstrap"] = {
        "resamples": resamples,
        "seed": seed,
        "level": bootstrap.LEVEL,
        "resampled": "members, with replacement, within each budget",
    }
    out["flops"] = "C as given per member (the sweep's plan: C = 6ND unless it says otherwise)"
    out["members"] = [dict(r) for r in rows]
    return out


def run(
    target: str,
    budgets: Sequence[float] = (),
    resamples: int = 200,
    seed: int = 0,
    out_dir: str | None = None,
    plots: bool = True,
) -> tuple[Path, Path, list[str]]:
    """Fit a sweep folder or a rows file; write fit.json and report.md (into the sweep folder, the rows file's
    folder, or out_dir). Returns their paths and the members still without a loss."""
    path = Path(target)
    if path.is_dir():
        if not (path / SWEEP_PLAN).exists():
            raise ValueError(
                f"{path}: no {SWEEP_PLAN} here: give a sweep's folder or a rows file (.json, .jsonl, .csv)."
            )
        rows, missing = collect_rows(path)
        plan = json.loads((path / SWEEP_PLAN).read_text())
        budgets = list(budgets) or plan.get("fit_budgets", [])
    elif path.is_file():
        rows, missing = read_rows(path), []
    else:
        raise ValueError(f"{path}: no such sweep folder or rows file.")
    result = fit_rows(rows, budgets, resamples, seed)
    folder = Path(out_dir) if out_dir else (path if path.is_dir() else path.parent)
    folder.mkdir(parents=True, exist_ok=True)
    fit_path = folder / FIT
    atomic.write_json(fit_path, result)  # a reader never sees half a fit
    from orchestrator.sweeps.report import write_report

    report_path = write_report(result, folder, plots=plots)
    return fit_path, report_path, missing
