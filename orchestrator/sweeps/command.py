"""`orch sweep fit|status|cancel|resume`, and what `orch config` and `orch submit` do with a sweep file."""

from __future__ import annotations

import json
from pathlib import Path


def _budget(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise ValueError(f"--budgets: {text!r} is not a positive number of FLOPs (e.g. 1e21)")
    return value


def show(path: str, overrides) -> int:
    """`orch config SWEEP.yaml`: the members as planned, then the first member's resolved job."""
    from omegaconf import OmegaConf

    from jobspec.sweep_file import load_sweep

    sweep = load_sweep(path, overrides)
    print(
        f"# sweep {sweep.name}: {len(sweep.members)} members, {sweep.parallel} at a time, FLOPs counted as "
        f"{sweep.flops}"
    )
    print("# member   n_layer d_model n_head  N (non-embedding)  D (tokens)   C (FLOPs)   steps  warmup")
    for m in sweep.members:
        print(
            f"# {m.name:<9}{m.n_layer:>7}{m.d_model:>8}{m.n_head:>7}{m.N:>19,}{m.D:>13,}{m.C:>12.3g}"
            f"{m.steps:>8}{m.warmup_steps:>8}"
        )
    print(f"# ---- member {sweep.members[0].name} (the others differ in the keys above)")
    print(OmegaConf.to_yaml(sweep.members[0].cfg), end="")
    return 0


def submit(path: str, overrides) -> int:
    """`orch submit SWEEP.yaml`: every member checked, then registered and handed to the sweep's supervisor."""
    from jobspec.sweep_file import load_sweep
    from orchestrator.registry import Registry
    from orchestrator.sweeps.submit import submit as submit_sweep

    sweep = load_sweep(path, overrides, check_count=lambda *a: check_count(path, *a))
    sweep_id, folder, runs = submit_sweep(sweep, Registry())
    print(f"submitted sweep {sweep_id} ({len(runs)} members, {sweep.parallel} at a time): {folder}")
    print(f"  follow it: orch pipeline wait {sweep_id}; then its fit: {folder}/report.md")
    return 0


def check_count(path: str, executor: str, plan_key: str, members: int) -> None:
    """What the executor can hold (on Slurm a sweep is one job array: at most MaxArraySize members), exit 2."""
    from orchestrator import executors
    from orchestrator.sweeps.submit import SIZE_CHECKS

    check = SIZE_CHECKS.get(executors.resolve(executor))
    if check is not None:
        check(path, plan_key, members)


def _sweep(registry, prefix: str) -> tuple[str, Path]:
    """The sweep id (a prefix will do) and its folder, from its members' registry rows."""
    sweep_id = registry.find_pipeline(prefix)
    from orchestrator.sweeps import SWEEP_PLAN

    for run in registry.list(pipeline_id=sweep_id):
        folder = Path(run.run_dir).parent / sweep_id
        if (folder / SWEEP_PLAN).exists():
            return sweep_id, folder
    raise LookupError(f"{sweep_id} is a pipeline, not a sweep (no {SWEEP_PLAN} beside its runs)")


def is_sweep(registry, text: str) -> bool:
    """True when text is a sweep's whole id (`orch cancel|resume SWEEP` then act on every member)."""
    try:
        return registry.find_pipeline(text) == text and _sweep(registry, text)[0] == text
    except LookupError:
        return False


def cmd_sweep_status(args) -> int:
    from orchestrator import executors
    from orchestrator.registry import Registry

    registry = Registry()
    sweep_id, folder = _sweep(registry, args.sweep)
    runs = executors.observed(registry, registry.list(pipeline_id=sweep_id))
    counts = {s: sum(r.state == s for r in runs) for s in sorted({r.state for r in runs})}
    print(f"{sweep_id}  {len(runs)} members  " + "  ".join(f"{s} {n}" for s, n in counts.items()) + f"  {folder}")
    for run in sorted(runs, key=lambda r: r.stage):
        print(f"  {run.stage:<10} {run.state:<10} {run.id}")
    if (folder / "fit.json").exists():
        fit = json.loads((folder / "fit.json").read_text())
        print(
            f"fit: alpha {fit['alpha']['value']:.3f}, beta {fit['beta']['value']:.3f}, E {fit['E']['value']:.3f}"
            f" ({folder / 'report.md'})"
        )
    return 0


def cmd_sweep_cancel(args) -> int:
    from orchestrator.registry import Registry
    from orchestrator.sweeps.submit import cancel

    registry = Registry()
    sweep_id, _ = _sweep(registry, args.sweep)
    runs = cancel(registry, sweep_id)
    print(f"cancelling sweep {sweep_id}: " + ", ".join(f"{r.stage} {r.state}" for r in runs))
    return 0


def cmd_sweep_resume(args) -> int:
    from orchestrator import pipelines
    from orchestrator.registry import Registry
    from orchestrator.sweeps.submit import resume

    registry = Registry()
    sweep_id, folder = _sweep(registry, args.sweep)
    pipelines.reconcile(registry, sweep_id)  # what Slurm or a dead supervisor says, recorded before we decide
    unfinished = [r for r in registry.list(pipeline_id=sweep_id) if not r.finished]
    if unfinished:
        raise ValueError(
            f"{sweep_id}: {len(unfinished)} member(s) still {unfinished[0].state}: resume once every "
            f"member has ended (`orch sweep cancel {sweep_id}` first to stop them)"
        )
    resumed = resume(registry, sweep_id, folder)
    print(
        f"resumed sweep {sweep_id}: {len(resumed)} member(s) again"
        + (f" ({', '.join(r.stage for r in resumed)})" if resumed else ": every member had completed")
    )
    return 0


def cmd_sweep_fit(args) -> int:
    from orchestrator.sweeps.fit import run  # numpy and scipy: only when fitting

    fit_path, report_path, missing = run(
        args.target, budgets=args.budgets or (), resamples=args.resamples, seed=args.seed, out_dir=args.out
    )
    if missing:
        print(f"note: {len(missing)} member(s) have no final loss yet and were left out: {', '.join(missing)}")
    print(f"fit: {fit_path}\nreport: {report_path}")
    return 0


def add_parser(sub) -> None:
    s = sub.add_parser("sweep", help="scaling-law sweeps: their members, and the law fitted to their losses")
    actions = s.add_subparsers(dest="action", required=True)
    f = actions.add_parser(
        "fit", help="fit Chinchilla's Approaches 2 and 3 with bootstrap intervals: fit.json and report.md"
    )
    f.add_argument(
        "target",
        help="a sweep's folder (its sweep.json), or a rows file (.json, .jsonl, .csv) with N, D, C, loss per member",
    )
    f.add_argument(
        "--budgets",
        type=_budget,
        nargs="+",
        help="FLOP budgets to give the compute-optimal N and D for (default: the sweep's fit_budgets)",
    )
    f.add_argument("--resamples", type=int, default=200, help="bootstrap resamples (default 200)")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--out", help="folder for fit.json and report.md (default: the sweep's, or the rows file's)")
    f.set_defaults(func=cmd_sweep_fit)
    for action, func, what in (
        ("status", cmd_sweep_status, "the members' states, counted, and the fit"),
        ("cancel", cmd_sweep_cancel, "cancel every unfinished member (each saves first)"),
        (
            "resume",
            cmd_sweep_resume,
            ("run again every member that ended without completing; completed members are never redone"),
        ),
    ):
        a = actions.add_parser(action, help=what)
        a.add_argument("sweep", help="the sweep id (or a prefix), printed by `orch submit SWEEP.yaml`")
        a.set_defaults(func=func)
