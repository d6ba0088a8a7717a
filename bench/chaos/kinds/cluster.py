"""A node lost on the local two-node Slurm (3): the run's rank on node2 dies with its node; Slurm requeues the
job; once node2 is back it resumes from its newest checkpoint and ends bitwise equal."""

from __future__ import annotations

import os
import random
import signal
import subprocess

from bench.chaos.census import Outcome
from bench.chaos.config import MAX_STEPS, committed_before
from bench.chaos.kinds import Context, Fault, one_run
from bench.chaos.watch import processes_of, trainer_folder
from bench.chaos.workspace import wait_for

NODE = "node2"


def scontrol_node(state: str, reason: str = "") -> None:
    cmd = ["scontrol", "update", f"nodename={NODE}", f"state={state}"] + ([f"reason={reason}"] if reason else [])
    subprocess.run(cmd, check=True, capture_output=True, timeout=60)


def node_state() -> str:
    return (
        subprocess.run(["sinfo", "-h", "-N", "-n", NODE, "-o", "%T"], capture_output=True, text=True, timeout=60)
        .stdout.strip()
        .lower()
    )


def restore_node() -> None:
    """Back in service, unless slurmd's answer has already brought it back (ReturnToService=2)."""
    if any(word in node_state() for word in ("down", "drain", "fail")):
        scontrol_node("resume")


def only_ours_on_node(job_id: str) -> bool:
    jobs = subprocess.run(
        ["squeue", "-h", "-w", NODE, "-o", "%i"], capture_output=True, text=True, timeout=60
    ).stdout.split()
    return set(jobs) <= {job_id}


def draw_node_lost(rng: random.Random, executor: str) -> Fault:
    step = rng.randint(1, MAX_STEPS - 1)
    return Fault(3, 0, "slurm", f"train.after_optimizer_step#{step}:wait", {"step": step, "async": rng.random() < 0.5})


def run_node_lost(fault: Fault, ctx: Context) -> Outcome:
    """One rank per node (resources.nodes=2): at a step, node2 goes DOWN and the job's processes there are killed
    (what a node losing power does to them); then node2 is set back to service, as a repaired node is."""
    p = fault.params

    def act(ws, watch, run_id, out):
        struck = watch.wait("fault", run_id)
        job = ws.refresh(run_id).slurm_job_id
        # the machine is shared: another user's job on node2 must not die with our fault
        wait_for(lambda: only_ours_on_node(job), f"{NODE} to run only job {job}", 300, 2.0)
        scontrol_node("down", "chaos: node lost")
        try:
            for proc in processes_of(ws):
                if trainer_folder(proc) and proc.env.get("SLURMD_NODENAME") == NODE:
                    os.kill(proc.pid, signal.SIGKILL)
        finally:
            restore_node()
        ws.release()
        return struck

    def teardown(ws):
        restore_node()

    floor = max(0, committed_before(p["step"]) - (4 if p["async"] else 0))
    return one_run(
        ctx,
        fault,
        "resources.nodes=2",
        "resources.nproc_per_node=1",
        f"checkpoint.async_save={p['async']}",
        spec=fault.point,
        act=act,
        restarts=1,  # Slurm requeues the job of a DOWN node (NODE_FAIL): a restart, not a retry of orch's
        floor=floor,
        teardown=teardown,
    )
