"""Faults of the control plane: kills of `orch submit` and of the supervisors (6), cancel/resume storms (7), many
orch commands at once on one registry with a writer killed mid-transaction (8)."""

from __future__ import annotations

import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time

from bench.chaos.census import Outcome, fault_fired, settle
from bench.chaos.config import JOB, MAX_STEPS, committed_before
from bench.chaos.kinds import Context, Fault, measured
from bench.chaos.workspace import ChaosError, Workspace, wait_for

# ---------------------------------------------------------------- 6: control-plane kills

CONTROL_KILLS = (
    "submit.run_folder",
    "submit.registered",
    "supervisor.started",
    "supervisor.trainer_exited",
    "supervisor SIGKILL",
    "pipeline.stage_started#1",
    "pipeline.stage_started#2",
)


def draw_control_kill(rng: random.Random, executor: str) -> Fault:
    what = rng.choice(CONTROL_KILLS)
    return Fault(6, 0, "local", what, {"step": rng.randint(1, MAX_STEPS - 1)})


def listed_state(ws: Workspace, run_id: str) -> str:
    """The state `orch runs` shows for the run (what a user sees), or "" when it is not listed."""
    for line in ws.orch("runs", "--limit", "1000", check=True).stdout.splitlines():
        if line.split()[:1] == [run_id]:
            return line.split()[3]
    return ""


def settle_lost(ws: Workspace, run_id: str, out: Outcome) -> None:
    """A run whose owner was killed: `orch runs` must show it LOST (never RUNNING or PENDING forever), `orch
    reconcile` must record it, and `orch resume` must start it again."""
    try:
        wait_for(lambda: listed_state(ws, run_id) == "LOST", f"`orch runs` to show {run_id} LOST", 120, 1.0)
    except ChaosError as e:
        out.wrong_state = True
        out.notes.append(f"{e} (it shows {listed_state(ws, run_id)})")
        return
    ws.orch("reconcile", run_id, check=True)
    if not ws.run(run_id).finished:
        out.wrong_state = True
        out.notes.append(f"`orch reconcile` left {run_id} {ws.run(run_id).state}")
        return
    ws.orch("resume", run_id, check=True)


def run_control_kill(fault: Fault, ctx: Context) -> Outcome:
    if fault.point.startswith("pipeline."):
        return run_pipeline_kill(fault, ctx)
    reference = ctx.references.get()
    what, step = fault.point, fault.params["step"]

    def body(ws: Workspace, watch, out: Outcome):
        fault_at, floor, restarts, spec, texts = None, None, 0, f"{what}:kill", ()
        if what.startswith("submit."):
            _, result = ws.submit(env=ws.env(spec), check=False)
            texts = (result.stdout,)
            if result.returncode != 137:
                out.not_fired = not fault_fired(ws, spec, *texts)
                raise ChaosError(f"`orch submit` was to be killed at {what}, but exited {result.returncode}")
            rows = ws.registry.list()
            if what == "submit.run_folder":  # no row yet: nothing to settle; the user submits again
                if rows:
                    out.wrong_state = True
                    out.notes.append(f"a submit killed before its registry row left {len(rows)} rows")
                run_id, _ = ws.submit()
            else:
                run_id = rows[0].id
                settle_lost(ws, run_id, out)
        elif what == "supervisor SIGKILL":  # mid-training, from outside: the trainer stops after saving
            spec = f"train.after_optimizer_step#{step}:wait"
            run_id, _ = ws.submit(env=ws.env(spec))
            fault_at, floor = watch.wait("fault", run_id), committed_before(step)
            os.kill(ws.run(run_id).pid, signal.SIGKILL)
            ws.release()
            settle_lost(ws, run_id, out)
            restarts = 1  # the trainer stops with its supervisor; `orch resume` continues it
        else:  # the supervisor kills itself at one of its own points
            run_id, _ = ws.submit(env=ws.env(spec))
            settle_lost(ws, run_id, out)
            # after an attempt, `orch resume` starts another (from the final checkpoint, if that attempt finished)
            restarts = 1 if what == "supervisor.trainer_exited" else 0
        ws.wait_finished(run_id)
        watch.tick()
        if not fault_fired(ws, spec, *texts):
            out.not_fired = True
            out.notes.append(f"the fault {spec} never fired")
        if len(ws.registry.list()) != 1:
            out.wrong_state = True
            out.notes.append(f"{len(ws.registry.list())} runs registered for one submission")
        settle(
            ws,
            watch,
            run_id,
            reference,
            out,
            step=MAX_STEPS,
            fault_at=fault_at,
            resume_floor=floor,
            restarts_expected=restarts,
        )

    return measured(ctx, fault, body)


PIPELINE = """kind: pipeline
name: chaospipe
executor: local
overrides: {overrides}
stages:
  a: {{job: {job}}}
  b: {{job: {job}, after: a, overrides: ["train.max_steps={b_steps}"]}}
"""
B_STEPS = 8


def run_pipeline_kill(fault: Fault, ctx: Context) -> Outcome:
    """The pipeline's supervisor dies right after starting stage a (#1) or b (#2). A started stage runs on under its
    own supervisor; a stage it had not started yet shows CANCELLED ("the pipeline's supervisor is gone"), is
    recorded so by `orch pipeline reconcile`, and `orch resume` runs it."""
    ref_a = ctx.references.get()
    ref_b = ctx.references.get(f"train.max_steps={B_STEPS}", f"checkpoint.init_from={ref_a}")

    def body(ws: Workspace, watch, out: Outcome):
        import json

        pipeline_file = ws.root / "pipeline.yaml"
        pipeline_file.write_text(PIPELINE.format(overrides=json.dumps(ws.job_overrides()), job=JOB, b_steps=B_STEPS))
        submitted = ws.orch("submit", str(pipeline_file), env=ws.env(f"{fault.point}:kill"), check=True)
        pipeline_id = re.search(r"submitted pipeline (\S+)", submitted.stdout).group(1)
        a, b = (f"{pipeline_id}-{s}" for s in ("a", "b"))
        ws.wait_finished(a)
        if not fault_fired(ws, f"{fault.point}:kill", submitted.stdout):
            out.not_fired = True
            out.notes.append(f"the fault {fault.point}:kill never fired")
        if fault.point.endswith("#1"):
            try:
                wait_for(lambda: listed_state(ws, b) == "CANCELLED", f"`orch runs` to show {b} CANCELLED", 120, 1.0)
            except ChaosError as e:
                out.wrong_state = True
                out.notes.append(str(e))
            ws.orch("pipeline", "reconcile", pipeline_id, check=True)
            ws.orch("resume", b, check=True)
        ws.wait_finished(b)
        watch.tick()
        settle(ws, watch, a, ref_a, out, step=MAX_STEPS)
        stage_b = Outcome()
        settle(ws, watch, b, ref_b, stage_b, step=B_STEPS)
        out.finished &= stage_b.finished
        out.bitwise_equal &= stage_b.bitwise_equal
        out.wrong_state |= stage_b.wrong_state
        out.notes += stage_b.notes

    return measured(ctx, fault, body)


# ---------------------------------------------------------------- 7: cancel/resume storms


def draw_storm(rng: random.Random, executor: str) -> Fault:
    cycles = rng.randint(2, 3)
    gaps = [round(rng.uniform(0, 10), 1) for _ in range(cycles)]
    return Fault(
        7,
        0,
        "local",
        "cancel; gap; resume",
        {
            "gaps_s": gaps,
            "double_resume": rng.randrange(cycles),
            "cancel_after_s": [round(rng.uniform(0, 3), 1) for _ in gaps],
            "no_wait": [rng.random() < 0.5 for _ in gaps],
            "async": rng.random() < 0.5,
        },
    )


def resume_when_allowed(ws: Workspace, run_id: str) -> None:
    """`orch resume`, as a user retries it: refused while the run is still CANCELLING, accepted once it stopped."""
    while True:
        result = ws.orch("resume", run_id)
        if result.returncode == 0:
            return
        if "CANCELLING" not in result.stderr and "RUNNING" not in result.stderr:
            raise ChaosError(f"`orch resume` refused: {result.stderr.strip()[-400:]}")
        ws.wait_state(run_id, ("CANCELLED", "COMPLETED", "FAILED"))


def double_resume(ws: Workspace, run_id: str, out: Outcome) -> None:
    """Two `orch resume` at once on a stopped run: exactly one starts it."""
    ws.wait_state(run_id, ("CANCELLED", "COMPLETED", "FAILED"))
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "orchestrator.cli", "resume", run_id],
            cwd=ws.root,
            env=ws.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    codes = sorted(p.wait(timeout=300) for p in procs)
    if codes != [0, 2]:
        out.wrong_state = True
        out.notes.append(f"two resumes at once exited {codes}: {[p.stderr.read()[-300:] for p in procs]}")


def run_storm(fault: Fault, ctx: Context) -> Outcome:
    p = fault.params
    reference = ctx.references.get(f"checkpoint.async_save={p['async']}")

    def body(ws: Workspace, watch, out: Outcome):
        run_id, _ = ws.submit(f"checkpoint.async_save={p['async']}")
        fault_at, cycles = None, 0
        for i, gap in enumerate(p["gaps_s"]):
            starts = len(watch.values("started", run_id))  # the attempt now starting must be training first
            wait_for(
                lambda: len(watch.values("started", run_id)) > starts or ws.run(run_id).finished,
                "an attempt to start training",
                300,
            )
            if ws.run(run_id).finished:
                break
            time.sleep(p["cancel_after_s"][i])  # the storm's own timing: this is the fault, not synchronization
            fault_at = fault_at if fault_at is not None else time.monotonic() - watch.started
            # `orch cancel` waits until the run has stopped; --no-wait returns at once, and a resume may meet it
            # CANCELLING
            ws.orch("cancel", *(["--no-wait"] if p["no_wait"][i] else []), run_id, check=True)
            time.sleep(gap)
            if i == p["double_resume"]:
                double_resume(ws, run_id, out)
            else:
                resume_when_allowed(ws, run_id)
            cycles += 1
        ws.wait_finished(run_id)
        watch.tick()
        if fault_at is None:  # the run finished before the storm's first cancel: nothing was tested
            out.not_fired = True
            out.notes.append("the run ended before the first `orch cancel`")
        # each accepted `orch resume` starts an attempt, which must resume from the newest checkpoint
        settle(ws, watch, run_id, reference, out, step=MAX_STEPS, restarts_expected=cycles)
        resumed = [int(s) for s in watch.values("resumed", run_id)]
        if any(b < a for a, b in zip(resumed, resumed[1:])):
            out.checkpoints_lost += 1
            out.notes.append(f"resumed from steps {resumed}: a later resume went back")

    return measured(ctx, fault, body)


# ---------------------------------------------------------------- 8: registry contention


def draw_contention(rng: random.Random, executor: str) -> Fault:
    loops = {"submit": 6, "runs": 7, "status": 7}
    return Fault(
        8,
        0,
        "local",
        "registry.write#1:kill",  # a submit's first write transaction is its registration
        {"loops": loops, "rounds": 2, "killed_loop": rng.randrange(loops["submit"])},
    )


def run_contention(fault: Fault, ctx: Context) -> Outcome:
    """20 loops of `orch submit` (their supervisors held before their first attempt), `orch runs` and
    `orch status --json`, all at once, while the chaos run trains; one submit is killed inside its registry
    transaction. Then: no "database is locked", the database passes its integrity check, every run is listed
    once, the held runs cancel cleanly, and the chaos run ends bitwise equal."""
    p = fault.params
    reference = ctx.references.get()

    def body(ws: Workspace, watch, out: Outcome):
        main_id, _ = ws.submit()
        held = ws.env("supervisor.started:wait")
        held.pop("ORCH_FAULT_ONCE")  # every held supervisor waits
        killed = ws.env(fault.point)
        killed.pop("ORCH_FAULT_ONCE")
        results, lock = [], threading.Lock()

        def loop(kind: str, i: int):
            for r in range(p["rounds"]):
                if kind == "submit":
                    env = killed if (i == p["killed_loop"] and r == 0) else held
                    result = ws.orch("submit", str(JOB), *ws.job_overrides(), env=env)
                elif kind == "runs":
                    result = ws.orch("runs", "--limit", "1000")
                else:
                    result = ws.orch("status", "--json")
                with lock:
                    results.append((kind, env is killed if kind == "submit" else False, result))

        threads = [threading.Thread(target=loop, args=(k, i)) for k, n in p["loops"].items() for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        check_contention(ws, results, main_id, out, fault.point)
        ws.wait_finished(main_id)
        watch.tick()
        settle(ws, watch, main_id, reference, out, step=MAX_STEPS)

    return measured(ctx, fault, body)


def check_contention(ws: Workspace, results: list, main_id: str, out: Outcome, fault_point: str) -> None:
    submitted = [main_id]
    for kind, was_killed, result in results:
        text = result.stdout + result.stderr
        if "database is locked" in text:
            out.wrong_state = True
            out.notes.append(f"`orch {kind}`: database is locked")
        expected = 137 if was_killed else 0
        if was_killed and not fault_fired(ws, fault_point, result.stdout):
            out.not_fired = True
            out.notes.append(f"the submit to be killed at {fault_point} was not")
        if result.returncode != expected:
            out.wrong_state = True
            out.notes.append(f"`orch {kind}` exited {result.returncode}, not {expected}: {text.strip()[-300:]}")
        if kind == "submit" and not was_killed:
            submitted += re.findall(r"^submitted (\S+) ", result.stdout, re.MULTILINE)
    with sqlite3.connect(ws.registry.path) as db:
        integrity = db.execute("PRAGMA integrity_check").fetchone()[0]
    if integrity != "ok":
        out.wrong_state = True
        out.notes.append(f"PRAGMA integrity_check: {integrity}")
    listed = [line.split()[0] for line in ws.orch("runs", "--limit", "1000", check=True).stdout.splitlines()[1:]]
    # The killed submit may die before its registration commits (rolled back: no run), or after it: then its one
    # run is LOST (no executor started it) or goes on under the supervisor it had already started. Either is whole.
    unreported = sorted(set(listed) - set(submitted))
    if len(listed) != len(set(listed)) or len(unreported) > 1 or not set(submitted) <= set(listed):
        out.wrong_state = True
        out.notes.append(
            f"`orch runs` lists {len(listed)} runs ({len(set(listed))} distinct) for {len(submitted)} submitted"
        )
    for run_id in [*submitted[1:], *unreported]:  # the held runs: cancelled before they train, then let go
        ws.orch("cancel", "--no-wait", run_id, check=run_id not in unreported)
    ws.release()
    for run_id in submitted[1:]:
        if ws.wait_finished(run_id, 300).state != "CANCELLED":
            out.wrong_state = True
            out.notes.append(f"held run {run_id} ended {ws.run(run_id).state}")
    for run_id in unreported:  # its owner died: `orch reconcile` records it (LOST, or how it ended)
        ws.orch("reconcile", run_id, check=True)
        ws.wait_finished(run_id, 300)
