"""Cancels on Slurm (13): `orch cancel` of a run, or `orch pipeline cancel` of a two-stage pipeline, while its first
run trains. Every Slurm job of the run or of the pipeline's stages must leave squeue; `orch runs` must show a stage
CANCELLED only once Slurm no longer holds its job (CANCELLING until then), and every stage CANCELLED in the end; the
cancelled run then resumes from the checkpoint it saved on the way out and ends bitwise equal."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
import time

from bench.chaos.census import Outcome, fault_fired, settle
from bench.chaos.config import JOB, MAX_STEPS, committed_before
from bench.chaos.kinds import Context, Fault, measured
from bench.chaos.kinds.control import B_STEPS, listed_state
from bench.chaos.workspace import ChaosError, Workspace

GONE_S = 180  # how long Slurm may take to end the cancelled jobs (the trainer saves first; KillWait after)
SHOWN_S = 120  # and then, how long until `orch runs` shows each CANCELLED

PIPELINE = """kind: pipeline
name: chaoscancel
executor: slurm
overrides: {overrides}
stages:
  a: {{job: {job}}}
  b: {{job: {job}, after: a, overrides: ["train.max_steps={b_steps}"]}}
"""


def draw_slurm_cancel(rng: random.Random, executor: str) -> Fault:
    what = rng.choice(["orch cancel", "orch cancel --no-wait", "orch pipeline cancel"])
    step = rng.randint(1, MAX_STEPS - 1)
    return Fault(
        13,
        0,
        "slurm",
        f"train.after_optimizer_step#{step}:wait",
        {"cancel": what, "step": step, "async": rng.random() < 0.5},
    )


def queued(job_ids: list[str]) -> list[str]:
    if not job_ids:
        return []
    out = subprocess.run(
        ["squeue", "-h", "-j", ",".join(job_ids), "-o", "%i"], capture_output=True, text=True, timeout=60
    )
    return out.stdout.split()


def watch_cancel(ws: Workspace, run_ids: list[str], out: Outcome) -> None:
    """Until the runs' Slurm jobs have left squeue: no run may show CANCELLED while its job is still there. Then
    each must show CANCELLED."""
    deadline = time.monotonic() + GONE_S
    while True:
        jobs = {r: ws.run(r).slurm_job_id for r in run_ids}
        still = set(queued([j for j in jobs.values() if j]))
        # shown CANCELLED, and Slurm still holds the job after that was read
        early = [r for r in run_ids if listed_state(ws, r) == "CANCELLED" and jobs[r] and queued([jobs[r]])]
        if early:
            out.wrong_state = True
            out.notes.append(f"shown CANCELLED while Slurm still held the job: {early}")
            break
        if not still:
            break
        if time.monotonic() > deadline:
            out.wrong_state = True
            out.notes.append(f"Slurm jobs {sorted(still)} still queued {GONE_S}s after the cancel")
            return
        time.sleep(1.0)
    deadline = time.monotonic() + SHOWN_S
    while (left := [r for r in run_ids if listed_state(ws, r) != "CANCELLED"]) and time.monotonic() < deadline:
        time.sleep(1.0)
    if left:
        out.wrong_state = True
        out.notes.append(
            f"{left} not shown CANCELLED {SHOWN_S}s after Slurm ended their jobs: {[listed_state(ws, r) for r in left]}"
        )


def run_slurm_cancel(fault: Fault, ctx: Context) -> Outcome:
    p = fault.params
    extra = (f"checkpoint.async_save={p['async']}",)
    reference = ctx.references.get(*extra)

    def body(ws: Workspace, watch, out: Outcome):
        if p["cancel"] == "orch pipeline cancel":
            pipeline_file = ws.root / "pipeline.yaml"
            pipeline_file.write_text(
                PIPELINE.format(overrides=json.dumps(ws.job_overrides(*extra)), job=JOB, b_steps=B_STEPS)
            )
            submitted = ws.orch("submit", str(pipeline_file), env=ws.env(fault.point), check=True)
            pipeline_id = re.search(r"submitted pipeline (\S+)", submitted.stdout).group(1)
            run_id, runs = f"{pipeline_id}-a", [f"{pipeline_id}-a", f"{pipeline_id}-b"]
            fault_at = watch.wait("fault", run_id)
            ws.orch("pipeline", "cancel", pipeline_id, check=True)
            cancel = None
        else:
            run_id, _ = ws.submit(*extra, env=ws.env(fault.point))
            runs = [run_id]
            fault_at = watch.wait("fault", run_id)
            # `orch cancel` waits until the run has stopped, which it can't while held: it runs beside us
            cancel = subprocess.Popen(
                [sys.executable, "-m", "orchestrator.cli", *p["cancel"].split()[1:], run_id],
                cwd=ws.root,
                env=ws.env(),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            ws.wait_state(run_id, ("CANCELLING", "CANCELLED"))
        ws.release()  # the held trainer goes on: it sees the stop signal, saves, and exits
        watch_cancel(ws, runs, out)
        if cancel is not None and cancel.wait(timeout=GONE_S + SHOWN_S) != 0:
            raise ChaosError(f"`{p['cancel']}` exited {cancel.returncode}: {cancel.stdout.read()[-600:]}")
        if not fault_fired(ws, fault.point):
            out.not_fired = True
            out.notes.append(f"the fault {fault.point} never fired")
        if ws.refresh(run_id).state != "CANCELLED":
            raise ChaosError(f"{run_id} ended {ws.run(run_id).state}, not CANCELLED: nothing to resume")
        ws.orch("resume", run_id, check=True)
        ws.wait_finished(run_id)
        watch.tick()
        # the cancelled attempt saved its step on the way out (logged), at least the one committed before it
        settle(
            ws,
            watch,
            run_id,
            reference,
            out,
            step=MAX_STEPS,
            restarts_expected=1,
            fault_at=fault_at,
            resume_floor=committed_before(p["step"]),
        )

    return measured(ctx, fault, body)
