"""What `resources.code: snapshot` adds to registering a run (orchestrator/runs.py register_run).

    python -m bench.code_snapshot              # 15 rounds
    python -m bench.code_snapshot --rounds 30

Each round registers three runs of jobs/pretrain.yaml in a real registry, in turn: `live` (the baseline: no
snapshot), `warm` (a snapshot, the same code already in the runs_dir's cache: a hash of the code) and `cold` (a
snapshot into a new runs_dir: the hash and the copy, what every test with its own tmp runs_dir pays once). The
figures are the medians over rounds and what each adds to `live` in milliseconds. The checkout is this one: the
code is hashed as it is (uncommitted edits included).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from bench.common import write_result
from jobspec import load_spec
from orchestrator import code_snapshot
from orchestrator.registry import Registry
from orchestrator.runs import register_run

JOB = str(Path(__file__).resolve().parents[1] / "jobs" / "pretrain.yaml")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    times: dict[str, list[float]] = {"live": [], "warm": [], "cold": []}
    with tempfile.TemporaryDirectory() as tmp:
        registry = Registry(Path(tmp) / ".orch" / "registry.db")
        warm_dir = Path(tmp) / "warm"
        code_snapshot.take(str(warm_dir))
        files = sum(1 for p in next((warm_dir / ".code").iterdir()).rglob("*") if p.is_file())
        for i in range(args.rounds):
            order = ["live", "warm", "cold"][i % 3 :] + ["live", "warm", "cold"][: i % 3]  # each goes first in turn
            for case in order:
                runs_dir = {"live": Path(tmp) / "live", "warm": warm_dir, "cold": Path(tmp) / f"cold{i}"}[case]
                code = "live" if case == "live" else "snapshot"
                cfg = load_spec(JOB, [f"runs_dir={runs_dir}", f"resources.code={code}"])
                start = time.perf_counter()
                register_run(registry, cfg, "local")
                times[case].append(time.perf_counter() - start)
    ms = {case: statistics.median(values) * 1000 for case, values in times.items()}
    figures = {
        "live_ms": round(ms["live"], 2),
        "warm_ms": round(ms["warm"], 2),
        "cold_ms": round(ms["cold"], 2),
        "warm_added_ms": round(ms["warm"] - ms["live"], 2),
        "cold_added_ms": round(ms["cold"] - ms["live"], 2),
        "snapshot_files": files,
    }
    for key, value in figures.items():
        print(f"{key:>16}: {value}")
    print("wrote", write_result("code_snapshot", {"rounds": args.rounds, "job": "jobs/pretrain.yaml"}, figures))


if __name__ == "__main__":
    main()
