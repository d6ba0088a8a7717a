"""The stage on this machine: the per-shard steps on a process pool of `workers` processes, the two
cross-shard steps in this process. Tasks that finished in an earlier attempt are skipped (tasks.py)."""

from __future__ import annotations

import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

from training.data.curate import tasks


def default_workers(cfg) -> int:
    return cfg.curate.workers or len(os.sched_getaffinity(0))


def _map(pool, step, run_dir: Path, n: int) -> list[dict]:
    if pool is None:
        return [step(run_dir, i) for i in range(n)]
    return list(pool.map(partial(step, run_dir), range(n)))


def run_stage(run_dir: Path, workers: int) -> dict:
    """analyze (pool) -> dedup -> write (pool) -> report; returns stats.json's content plus wall seconds per
    step (what bench/data_curation.py measures)."""
    plan = tasks.read_plan(run_dir)
    n = len(plan["shards"])
    wall = {}
    # forkserver: workers start from a clean interpreter, not a fork of one that may hold torch's threads
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["training.data.curate.tasks"])  # imported once, not once per worker
    with ProcessPoolExecutor(workers, mp_context=context) if workers > 1 else _NoPool() as pool:
        start = time.perf_counter()
        analyzed = _map(pool, tasks.analyze, run_dir, n)
        wall["analyze"] = time.perf_counter() - start
        start = time.perf_counter()
        tasks.dedup(run_dir)
        wall["dedup"] = time.perf_counter() - start
        start = time.perf_counter()
        _map(pool, tasks.write, run_dir, n)
        wall["write"] = time.perf_counter() - start
    start = time.perf_counter()
    stats = tasks.report(run_dir)
    wall["report"] = time.perf_counter() - start
    skipped = sum(1 for a in analyzed if a.get("skipped"))
    return dict(stats, wall_seconds={k: round(v, 3) for k, v in wall.items()}, analyze_skipped=skipped)


class _NoPool:
    """One worker: the tasks run in this process (no pool to start, nothing to pickle)."""

    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
