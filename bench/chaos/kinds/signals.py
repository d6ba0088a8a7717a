"""Faults that reach a running trainer: stop signals at each phase (2), a hung rank (9), a non-finite loss (10),
a wall-clock jump during the time-budget calibration (11)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
from pathlib import Path

from bench.chaos.census import Outcome
from bench.chaos.config import EVERY, MAX_STEPS, SHARDS_PER_SAVE, VAL_EVERY, committed_before
from bench.chaos.kinds import Context, Fault, one_run
from bench.chaos.watch import processes_of, trainer_folder
from bench.chaos.workspace import ChaosError, wait_for

# ---------------------------------------------------------------- 2: stop signals at each phase

PHASES = ("data_prep", "model_build", "mid_step", "validation", "sync_save", "async_save", "checkpoint_step")


def phase_point(rng: random.Random, phase: str) -> tuple[str, bool, int]:
    """(fault point with its count, async saves?, the newest checkpoint committed when it strikes)."""
    if phase == "data_prep":
        return "data.prepare@0#1", rng.random() < 0.5, 0
    if phase == "model_build":
        return "model.build#1", rng.random() < 0.5, 0
    if phase == "mid_step":
        step = rng.randint(1, MAX_STEPS - 1)
        return f"train.before_optimizer_step#{step}", rng.random() < 0.5, committed_before(step)
    if phase == "validation":
        step = rng.choice(range(VAL_EVERY, MAX_STEPS, VAL_EVERY))
        return f"train.validation#{step}", False, step - EVERY  # validation comes before that step's save
    if phase == "sync_save":
        save = rng.randint(1, MAX_STEPS // EVERY)
        return f"checkpoint.manifest#{save}", False, EVERY * (save - 1)
    if phase == "async_save":  # in the writer thread of a background save
        save = rng.randint(1, MAX_STEPS // EVERY - 1)
        n = SHARDS_PER_SAVE * (save - 1) + rng.randint(1, SHARDS_PER_SAVE)
        return f"checkpoint.shard_write@{rng.randint(0, 1)}#{n}", True, EVERY * (save - 1)
    step = rng.choice(range(EVERY, MAX_STEPS, EVERY))  # on a checkpoint step, before its save
    return f"train.after_optimizer_step#{step}", rng.random() < 0.5, step - EVERY


def draw_stop_signal(rng: random.Random, executor: str) -> Fault:
    how = rng.choice(["sigusr2", "cancel+resume"] + (["scontrol requeue"] if executor == "slurm" else []))
    phase = rng.choice(PHASES)
    point, async_save, floor = phase_point(rng, phase)
    spec = f"{point}:sigusr2" if how == "sigusr2" else f"{point}:wait"
    return Fault(2, 0, executor, spec, {"signal": how, "phase": phase, "async": async_save, "floor": floor})


def run_stop_signal(fault: Fault, ctx: Context) -> Outcome:
    p = fault.params

    def act(ws, watch, run_id, out):
        if p["signal"] == "sigusr2":
            return None
        struck = watch.wait("fault", run_id)
        if p["signal"] == "scontrol requeue":
            job = ws.refresh(run_id).slurm_job_id
            subprocess.run(["scontrol", "requeue", job], check=True, capture_output=True, timeout=60)
            ws.release()
            return struck
        ws.orch("cancel", "--no-wait", run_id, check=True)  # it can only stop once we let it go on
        ws.release()
        ws.wait_state(run_id, ("CANCELLED", "COMPLETED", "FAILED"))
        ws.orch("resume", run_id, check=True)
        return struck

    # A stop signal means a requeue or a resume that trains again, but one that lands in the final save lets that
    # attempt finish; and a cancel before training may end the attempt before it started training (the resume,
    # the harness's own, is then the first attempt that does).
    final_save = fault.point.startswith(f"checkpoint.manifest#{MAX_STEPS // EVERY}:")
    before_training = p["phase"] in ("data_prep", "model_build") and p["signal"] != "sigusr2"
    restarts = 0 if (p["signal"] == "sigusr2" and final_save) or before_training else 1
    return one_run(
        ctx,
        fault,
        f"checkpoint.async_save={p['async']}",
        spec=fault.point,
        act=act,
        floor=p["floor"],
        restarts=restarts,
    )


# ---------------------------------------------------------------- 9: a hung rank

HANG_POINTS = ("train.loss", "train.before_optimizer_step", "train.after_optimizer_step", "checkpoint.shard_write")
HUNG_TIMEOUT_S = 20  # parallel.collective_timeout_s for these faults: the bound on noticing a silent rank
# The attempt ends within 2 T + G (docs/reliability.md): torchrun's G is 30 s; 15 s more for a loaded machine.
HUNG_BOUND_S = 2 * HUNG_TIMEOUT_S + 30 + 15


def draw_hung_rank(rng: random.Random, executor: str) -> Fault:
    point = rng.choice(HANG_POINTS)
    rank, async_save = rng.randint(0, 1), rng.random() < 0.5
    how = rng.choice(["hang", "SIGSTOP"])
    if point == "checkpoint.shard_write":
        save = rng.randint(1, MAX_STEPS // EVERY - 1)
        count, floor = SHARDS_PER_SAVE * (save - 1) + rng.randint(1, SHARDS_PER_SAVE), EVERY * (save - 1)
    else:
        count = rng.randint(1, MAX_STEPS - 1)
        floor = committed_before(count) if not async_save else max(0, committed_before(count) - EVERY)
    spec = f"{point}@{rank}#{count}:{'hang' if how == 'hang' else 'wait'}"
    return Fault(9, 0, executor, spec, {"how": how, "async": async_save, "floor": floor, "rank": rank})


def run_hung_rank(fault: Fault, ctx: Context) -> Outcome:
    p = fault.params

    def act(ws, watch, run_id, out):
        struck = watch.wait("fault", run_id)
        if p["how"] == "SIGSTOP":  # the whole process stops, as a rank whose node froze
            pid = wait_for(
                lambda: next(
                    (proc.pid for proc in processes_of(ws) if (w := trainer_folder(proc)) and w[1] == p["rank"]), None
                ),
                f"rank {p['rank']}'s process",
            )
            os.kill(pid, signal.SIGSTOP)
        ended = watch.wait("retry", run_id, after=struck, timeout=HUNG_BOUND_S + 120) - struck
        out.notes.append(
            f"the hung attempt ended {ended:.1f}s after the rank stopped answering "
            f"(collective timeout {HUNG_TIMEOUT_S}s)"
        )
        if ended > HUNG_BOUND_S:
            out.bound_exceeded = True
        return struck

    return one_run(
        ctx,
        fault,
        f"checkpoint.async_save={p['async']}",
        f"parallel.collective_timeout_s={HUNG_TIMEOUT_S}",
        spec=fault.point,
        act=act,
        retries=1,
        floor=p["floor"],
    )


# ---------------------------------------------------------------- 10: a non-finite loss


def draw_nonfinite(rng: random.Random, executor: str) -> Fault:
    rank = rng.choice(["", "@0", "@1"])
    return Fault(10, 0, executor, f"train.loss{rank}#{rng.randint(1, MAX_STEPS)}:nan", {"async": rng.random() < 0.5})


def run_nonfinite(fault: Fault, ctx: Context) -> Outcome:
    def act(ws, watch, run_id, out):
        run = ws.wait_finished(run_id)
        summary = Path(run.run_dir) / "summary.json"
        skipped = json.loads(summary.read_text()).get("skipped_steps") if summary.is_file() else None
        if skipped != 1:
            out.wrong_state = True
            out.notes.append(f"summary.json counts {skipped} skipped steps, not 1")
        return None

    # compared with a reference run that has the same non-finite step
    return one_run(
        ctx,
        fault,
        f"checkpoint.async_save={fault.params['async']}",
        spec=fault.point,
        act=act,
        reference_fault=fault.point,
    )


# ---------------------------------------------------------------- 11: a wall-clock jump during calibration

CLOCK_STEPS = 40  # the time budget is calibrated over steps 10..30


def faketime_library() -> str:
    try:
        import libfaketime
    except ImportError:
        raise ChaosError("kind 11 needs the libfaketime package (pip install libfaketime, in the test extra)") from None
    return str(Path(libfaketime.__file__).parent / "vendor" / "libfaketime" / "src" / "libfaketime.so.1")


def draw_clock_jump(rng: random.Random, executor: str) -> Fault:
    hours = rng.choice([-3, -2, -1, 1, 2, 3])
    step = rng.randint(11, 29)
    return Fault(11, 0, "local", f"train.after_optimizer_step#{step}:wait", {"jump_h": hours, "step": step})


def run_clock_jump(fault: Fault, ctx: Context) -> Outcome:
    """Every process of the run reads a wall clock that jumps by `jump_h` hours at a step inside the calibration
    window (libfaketime; time.monotonic is left alone, as a real NTP step leaves it). The schedule fitted to the
    budget must not move: with 30 minutes for 40 steps it keeps all 40."""
    p = fault.params
    clock = ctx.root / f"clock-{fault.seed}"
    clock.write_text("+0\n")
    env = {
        "LD_PRELOAD": faketime_library(),
        "FAKETIME_TIMESTAMP_FILE": str(clock),
        "FAKETIME_NO_CACHE": "1",
        "DONT_FAKE_MONOTONIC": "1",
    }

    def act(ws, watch, run_id, out):
        struck = watch.wait("fault", run_id)
        clock.write_text(f"{p['jump_h']:+d}h\n")
        ws.release()
        run = ws.wait_finished(run_id)
        seen = run.ended_at - run.started_at  # both by the supervisor's wall clock, before and after the jump
        if abs(seen - 3600 * p["jump_h"]) > 900:
            raise ChaosError(f"the wall clock did not jump: the run took {seen:.0f}s by it")
        log = ws.log_text(run)
        if "the schedule now ends" in log:
            out.wrong_state = True
            out.notes.append("the wall-clock jump moved the fitted schedule")
        return struck

    extra = (f"train.max_steps={CLOCK_STEPS}", "train.time_budget_min=30")
    return one_run(ctx, fault, *extra, spec=fault.point, act=act, env_extra=env, step=CLOCK_STEPS)
