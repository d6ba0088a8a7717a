"""Faults on the checkpoint files: a kill inside each save phase (1), a full disk (4), a corrupted checkpoint (5),
stale leftovers from earlier crashes and the user's own files (12)."""

from __future__ import annotations

import random

from bench.chaos.census import Outcome
from bench.chaos.config import EVERY, SHARDS_PER_SAVE
from bench.chaos.kinds import Context, Fault, one_run

SAVES = 6  # 5 periodic saves (steps 4..20) and the final one (24)


# ---------------------------------------------------------------- 1: a kill inside a save

def draw_save_kill(rng: random.Random, executor: str) -> Fault:
    async_save = rng.random() < 0.5
    phases = ["checkpoint.shard_write", "checkpoint.manifest", "checkpoint.commit", "checkpoint.prune"]
    point = rng.choice(phases + (["checkpoint.staging"] if async_save else []))
    # staging happens only in background saves: the periodic ones, not the final save
    save = rng.randint(1, SAVES - 1 if point == "checkpoint.staging" else SAVES)
    if point == "checkpoint.shard_write":  # each rank counts its own files
        spec = f"{point}@{rng.randint(0, 1)}#{SHARDS_PER_SAVE * (save - 1) + rng.randint(1, SHARDS_PER_SAVE)}:kill"
    elif point == "checkpoint.staging":
        spec = f"{point}@{rng.randint(0, 1)}#{save}:kill"
    else:  # rank 0 writes the manifest, commits and prunes
        spec = f"{point}#{save}:kill"
    return Fault(1, 0, executor, spec, {"keep_last": rng.choice([1, 2]), "async": async_save, "save": save})


def run_save_kill(fault: Fault, ctx: Context) -> Outcome:
    p = fault.params
    step = EVERY * p["save"]
    committed = step if fault.point.startswith("checkpoint.prune") else step - EVERY
    return one_run(ctx, fault, f"checkpoint.keep_last={p['keep_last']}", f"checkpoint.async_save={p['async']}",
                   spec=fault.point, retries=1, floor=committed)
