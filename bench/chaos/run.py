"""Draw the faults, run them one after another, and tabulate: bench/results/chaos-<device>-<date>.json."""

from __future__ import annotations

import random
import statistics
import time
import traceback

from bench.chaos.census import Outcome
from bench.chaos.kinds import KINDS, Context, Fault, executor_for

FIGURES = (
    "finished",
    "bitwise_equal",
    "checkpoints_lost",
    "crash_loops",
    "orphans",
    "leftovers",
    "wrong_state",
    "not_fired",
    "wrong_restarts",
)


def draw(n: int, seed: int, kinds: list[int], executor: str) -> list[Fault]:
    """n faults spread evenly over `kinds` (each round visits every kind once, in a shuffled order), each with
    its own seed, from which its parameters are drawn: one fault replays from (kind, its seed) alone."""
    rng = random.Random(seed)
    order: list[int] = []
    while len(order) < n:
        round_ = list(kinds)
        rng.shuffle(round_)
        order += round_
    return [draw_one(kind, rng.randrange(2**31), executor) for kind in order[:n]]


def draw_one(kind: int, seed: int, executor: str) -> Fault:
    k = KINDS[kind]
    fault = k.draw(random.Random(seed), executor_for(k.executors, executor))
    fault.seed = seed
    return fault


def run_one(fault: Fault, ctx: Context) -> tuple[Outcome, float]:
    started = time.monotonic()
    try:
        out = KINDS[fault.kind].run(fault, ctx)
    except Exception as e:  # a harness error is the fault's row, not the end of the benchmark
        out = Outcome(notes=[f"error: {type(e).__name__}: {e}", traceback.format_exc(limit=3)])
    return out, time.monotonic() - started


def tabulate(rows: list[dict]) -> dict:
    recovery = [r["recovery_s"] for r in rows if r.get("recovery_s") is not None]
    figures = {"faults": len(rows)}
    for name in FIGURES:
        figures[name] = sum(int(r[name]) for r in rows)
    figures["recovery_s"] = {
        "median": round(statistics.median(recovery), 1) if recovery else None,
        "max": round(max(recovery), 1) if recovery else None,
        "measured": len(recovery),
    }
    figures["two_trainers"] = sum(r["two_trainers"] for r in rows)
    by_kind = {}
    for r in rows:
        k = by_kind.setdefault(r["kind"], {"faults": 0, "ok": 0, "executors": set()})
        k["faults"] += 1
        k["ok"] += r["outcome"] == "ok"
        k["executors"].add(r["executor"])
    figures["by_kind"] = {str(k): {**v, "executors": sorted(v["executors"])} for k, v in sorted(by_kind.items())}
    return figures


def row_of(fault: Fault, out: Outcome, seconds: float) -> dict:
    return {
        "kind": fault.kind,
        "name": KINDS[fault.kind].name,
        "point": fault.point,
        "seed": fault.seed,
        "executor": fault.executor,
        "params": fault.params,
        **out.row(),
        "seconds": round(seconds, 1),
    }


def print_row(i: int, n: int, row: dict) -> None:
    rec = f"{row['recovery_s']:.1f}s" if row.get("recovery_s") is not None else "-"
    print(
        f"[chaos {i}/{n}] kind {row['kind']} {row['executor']:<5} {row['point']} {row['params']}: {row['outcome']} "
        f"(recovery {rec}, {row['seconds']:.0f}s)",
        flush=True,
    )
    if row["outcome"] != "ok":
        for note in row["notes"]:
            print(f"      {note}", flush=True)
