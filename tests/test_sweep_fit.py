"""The scaling-law fit (orchestrator/sweeps): it recovers a known law, its intervals cover the truth, and
`orch sweep fit` writes fit.json and report.md from a rows file or a sweep folder. bench/scaling_fit.py
measures coverage on 200 ladders; this is its fast form."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.optimize import check_grad

from bench.scaling_fit import DOC, TABLES, TRUE, ladder, recovered
from orchestrator.cli import main
from orchestrator.sweeps import approach2, approach3
from orchestrator.sweeps.bootstrap import intervals
from orchestrator.sweeps.fit import fit_rows


def _orch(*argv) -> int:
    with pytest.raises(SystemExit) as e:
        main(list(argv))
    return e.value.code


def _write_rows(path, N, D, C, L):
    path.write_text(
        json.dumps(
            [{"N": float(n), "D": float(d), "C": float(c), "loss": float(loss)} for n, d, c, loss in zip(N, D, C, L)]
        )
    )
    return path


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_approach3_recovers_epoch_refit_of_chinchilla(seed):
    N, D, _, L = ladder(np.random.default_rng(seed))
    law = approach3.fit(N, D, L)
    assert recovered(law), law  # alpha, beta within 5%, E within 2%
    assert abs(law.a / TRUE.a - 1) < 0.05


def test_objective_gradient_and_grid_agree():
    N, D, _, L = ladder(np.random.default_rng(3))
    logN, logD, logL = np.log(N), np.log(D), np.log(L)

    def f(t):
        return approach3.objective(t, logN, logD, logL)

    x = approach3.theta(TRUE) + 0.05
    assert check_grad(lambda t: f(t)[0], lambda t: f(t)[1], x) < 1e-4 * np.linalg.norm(f(x)[1]) + 1e-6
    i = 1234
    assert approach3.grid_values(logN, logD, logL)[i] == pytest.approx(f(approach3.GRID[i])[0])


def test_bootstrap_intervals_cover_the_true_law():
    """20 ladders (bench.scaling_fit measures 200): the 95% intervals of E, alpha, beta cover the truth on at
    least 80% of them, and each interval holds its own estimate."""
    covered = {"E": 0, "alpha": 0, "beta": 0}
    for seed in range(20):
        N, D, C, L = ladder(np.random.default_rng(100 + seed))
        _, _, iv = intervals(N, D, C, L, resamples=30, seed=seed)
        for name in covered:
            it = iv[f"approach3.{name}"]
            assert it.low <= it.value <= it.high and it.resamples == 30
            covered[name] += it.covers(getattr(TRUE, name))
    assert min(covered.values()) >= 16, covered


def test_approach2_exact_when_sizes_centre_on_each_optimum_biased_on_a_fixed_list():
    N, D, C, L = ladder(np.random.default_rng(0), noise=0.0, sizes=5, span=4.0)
    fit = approach2.fit(N, D, C, L)
    assert fit.a == pytest.approx(TRUE.a, abs=1e-9) and fit.b == pytest.approx(TRUE.b, abs=1e-9)
    n, _ = fit.optimal(1e21)  # the vertex sits a constant factor off the optimum: the exponents are exact, G not
    assert n == pytest.approx(TRUE.optimal(1e21)[0], rel=0.02)
    lo, hi = TRUE.optimal(1e18)[0] / 4, TRUE.optimal(1e22)[0] * 4
    N, D, C, L = ladder(np.random.default_rng(0), noise=0.0, fixed_sizes=np.geomspace(lo, hi, 9))
    assert approach2.fit(N, D, C, L).a < TRUE.a - 0.03  # docs/scaling.md: the parabola's bias


def test_approach2_leaves_out_a_curve_without_a_minimum():
    N = np.array([1e6, 2e6, 4e6] * 2)
    C = np.array([1e15] * 3 + [1e16] * 3)
    D = C / (6 * N)
    L = np.array([3.0, 3.1, 3.3, 2.9, 2.85, 2.7])  # the second budget falls ever faster: concave
    fit = approach2.fit(N, D, C, L)
    assert [m.C for m in fit.minima] == [1e15] and "no minimum" in fit.skipped[1e16] and fit.a is None


def test_orch_sweep_fit_writes_fit_json_and_report(tmp_path, capsys):
    N, D, C, L = ladder(np.random.default_rng(5))
    rows = _write_rows(tmp_path / "rows.json", N, D, C, L)
    assert _orch("sweep", "fit", str(rows), "--budgets", "1e23", "--resamples", "30") == 0
    fit = json.loads((tmp_path / "fit.json").read_text())
    for name in ("E", "A", "B", "alpha", "beta", "a", "b"):
        lo, hi = fit[name]["ci95"]
        assert lo <= fit[name]["value"] <= hi, name
    assert len(fit["members"]) == len(N) and set(fit["members"][0]) >= {"N", "D", "C", "loss"}
    optimal = fit["compute_optimal"][0]
    assert optimal["C"] == 1e23
    n3 = optimal["approach3"]["N"]
    assert n3["ci95"][0] <= TRUE.optimal(1e23)[0] <= n3["ci95"][1]
    report = (tmp_path / "report.md").read_text()
    assert "![isoflop.png](isoflop.png)" in report and (tmp_path / "isoflop.png").stat().st_size > 0
    assert (tmp_path / "n_opt.png").exists() and "alpha (Approach 3)" in report


def test_orch_sweep_fit_refuses_bad_rows_naming_file_row_and_key(tmp_path, capsys):
    bad = tmp_path / "rows.csv"
    bad.write_text("N,D,C,loss\n1e6,2e7,1.2e14,3.1\n2e6,1e7,1.2e14,nan\n")
    assert _orch("sweep", "fit", str(bad)) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "row 1" in err and "'loss'" in err and "'nan'" in err
    assert not (tmp_path / "fit.json").exists()


def test_orch_sweep_fit_reads_a_sweep_folder_and_names_unfinished_members(tmp_path, capsys):
    N, D, C, L = ladder(np.random.default_rng(6), sizes=4, span=4.0)
    members = []
    for i, (n, d, c, loss) in enumerate(zip(N, D, C, L)):
        run_dir = tmp_path / "runs" / f"m{i}"
        run_dir.mkdir(parents=True)
        if i != 3:  # member m3 has not finished: no summary.json
            (run_dir / "summary.json").write_text(json.dumps({"val_loss": float(loss), "tokens_seen": float(d)}))
        members.append({"id": f"m{i}", "run_dir": str(run_dir), "N": float(n), "D": float(d), "C": float(c)})
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "sweep.json").write_text(json.dumps({"members": members, "fit_budgets": [1e22]}))
    assert _orch("sweep", "fit", str(sweep), "--resamples", "10") == 0
    assert "m3" in capsys.readouterr().out
    fit = json.loads((sweep / "fit.json").read_text())
    assert len(fit["members"]) == len(N) - 1 and fit["compute_optimal"][0]["C"] == 1e22


@pytest.mark.parametrize("marker,make", TABLES, ids=[m for m, _ in TABLES])
def test_docs_scaling_tables_are_what_the_results_write(marker, make):
    text = DOC.read_text()
    between = text.split(f"<!-- {marker} -->\n", 1)[1].split(f"\n<!-- /{marker} -->", 1)[0]
    assert between == make(), f"docs/scaling.md's {marker} table: run `python -m bench.scaling_fit --docs`"


def test_a_grid_without_isoflop_curves_takes_a_and_b_from_approach3(tmp_path):
    rng = np.random.default_rng(7)
    N = np.repeat(np.geomspace(1e7, 1e9, 4), 3)
    D = np.tile(np.geomspace(1e9, 1e11, 3), 4)
    L = TRUE.loss(N, D) * np.exp(rng.normal(0, 0.005, len(N)))
    fit = fit_rows([{"N": n, "D": d, "C": 6 * n * d, "loss": loss} for n, d, loss in zip(N, D, L)], resamples=10)
    assert fit["a_b_from"] == "approach3" and fit["a"] == fit["approach3"]["a"] and fit["approach2"]["a"] is None
    assert fit["approach2"]["minima"] == []  # a budget holds one or two members: no curve to fit a parabola to
    assert all("a parabola needs 3" in why for why in fit["approach2"]["skipped"].values())
