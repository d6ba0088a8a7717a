"""Faults on the checkpoint files: a kill inside each save phase (1), a full disk (4), a corrupted checkpoint (5),
stale leftovers from earlier crashes and the user's own files (12)."""

from __future__ import annotations

import errno
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from omegaconf import OmegaConf

from bench.chaos.census import Outcome
from bench.chaos.config import EVERY, JOB, MAX_STEPS, SHARDS_PER_SAVE, committed_before
from bench.chaos.kinds import Context, Fault, one_run
from bench.chaos.watch import processes_of, trainer_folder
from bench.chaos.workspace import wait_for
from jobspec.contract import checkpoint_name
from training.checkpoint import step_dirs, verify

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
    return one_run(
        ctx,
        fault,
        f"checkpoint.keep_last={p['keep_last']}",
        f"checkpoint.async_save={p['async']}",
        spec=fault.point,
        retries=1,
        floor=committed,
    )


# ---------------------------------------------------------------- 4: a full disk

DISK_MB = 16  # the run folder's tmpfs: room for the run with keep_last 2, and a filler takes the rest


def fill(folder: Path) -> Path:
    """Write zeros into folder/filler until the disk is full."""
    filler, chunk = folder / "filler", b"\0" * (1 << 16)
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(chunk)
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
    return filler


def draw_disk_full(rng: random.Random, executor: str) -> Fault:
    step = rng.randint(2, MAX_STEPS - 1)
    return Fault(4, 0, executor, f"train.after_optimizer_step#{step}:wait", {"step": step, "async": rng.random() < 0.5})


def run_disk_full(fault: Fault, ctx: Context) -> Outcome:
    """runs_dir on a small tmpfs, filled at a step: the run must stop as a user error (no retry), its newest
    checkpoint and config.yaml intact; freed, `orch resume` finishes it."""
    p = fault.params

    def setup(ws):
        ws.runs_dir.mkdir(parents=True)
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={DISK_MB}m", "tmpfs", str(ws.runs_dir)],
            check=True,
            capture_output=True,
        )

    def act(ws, watch, run_id, out):
        struck = watch.wait("fault", run_id)
        filler = fill(ws.runs_dir)
        ws.release()
        run = ws.wait_finished(run_id)
        if run.state != "FAILED" or "full" not in (run.reason or ""):
            out.wrong_state = True
            out.notes.append(f"on a full disk the run ended {run.state}: {run.reason}")
        folder = Path(run.run_dir)
        newest = next(iter(step_dirs(folder / "checkpoints")), None)
        if newest is not None and verify(newest) is not None:
            out.checkpoints_lost += 1
            out.notes.append(f"{newest.name} does not verify after the disk filled: {verify(newest)}")
        if not OmegaConf.load(folder / "config.yaml").get("model"):
            out.wrong_state = True
            out.notes.append("config.yaml was damaged by the full disk")
        filler.unlink()
        ws.orch("resume", run_id, check=True)
        return struck

    def teardown(ws):  # the run folders go with the tmpfs: their logs are kept beside it for a person to read
        shutil.copytree(
            ws.runs_dir, ws.root / "runs-on-the-full-disk", ignore=shutil.ignore_patterns("filler"), dirs_exist_ok=True
        )
        subprocess.run(["umount", "-l", str(ws.runs_dir)], capture_output=True)

    floor = committed_before(p["step"]) - (EVERY if p["async"] else 0)
    return one_run(
        ctx,
        fault,
        f"checkpoint.async_save={p['async']}",
        spec=fault.point,
        act=act,
        floor=max(0, floor),
        restarts=1,
        setup=setup,
        teardown=teardown,
    )  # the `orch resume` once the disk is freed


# ---------------------------------------------------------------- 5: a corrupted checkpoint

TARGETS = {
    "model shard": "model/*.safetensors",
    "optimizer shard": "optim/*.safetensors",
    "manifest": "manifest.json",
    "trainer state": "trainer_state.json",
    "RNG state": "rng/rank_*.json",
}


def damage(path: Path, how: str, rng: random.Random) -> str:
    size = path.stat().st_size
    if how == "truncate":
        keep = rng.randrange(size)
        os.truncate(path, keep)
        return f"truncated {path.name} to {keep} of {size} bytes"
    offset, bit = rng.randrange(size), rng.randrange(8)
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ (1 << bit)]))
    return f"flipped bit {bit} of byte {offset} of {path.name}"


def draw_corruption(rng: random.Random, executor: str) -> Fault:
    step = rng.randint(2 * EVERY + 1, MAX_STEPS - 1)  # two checkpoints committed: the newest is damaged
    return Fault(
        5,
        0,
        executor,
        f"train.after_optimizer_step#{step}:wait",
        {
            "step": step,
            "target": rng.choice(sorted(TARGETS)),
            "damage": rng.choice(["bitflip", "truncate"]),
            "restart": rng.choice(["kill", "requeue"]),
        },
    )


def run_corruption(fault: Fault, ctx: Context) -> Outcome:
    """The newest checkpoint is damaged while the run trains, then the run restarts: killed (it must skip the
    damaged one, with a warning, and resume from the one before) or requeued (it saves a newer one first; no good
    checkpoint may be pruned in favour of the damaged one)."""
    p = fault.params
    newest = committed_before(p["step"])
    rng = random.Random(fault.seed)

    def act(ws, watch, run_id, out):
        struck = watch.wait("fault", run_id)
        folder = Path(ws.run(run_id).run_dir) / "checkpoints" / checkpoint_name(newest)
        target = rng.choice(sorted(folder.glob(TARGETS[p["target"]])))
        out.notes.append(damage(target, p["damage"], rng))
        ranks = [proc for proc in processes_of(ws) if trainer_folder(proc)]
        if p["restart"] == "kill":
            for proc in ranks:
                os.kill(proc.pid, signal.SIGKILL)
        else:  # a requeue: the trainers are told to stop (Slurm's SIGTERM, a preemption's SIGUSR2) and save first
            if ws.run(run_id).slurm_job_id:
                subprocess.run(["scontrol", "requeue", ws.run(run_id).slurm_job_id], check=True, capture_output=True)
            else:
                for proc in ranks:
                    os.kill(proc.pid, signal.SIGUSR2)
            ws.release()
        return struck

    # killed: the damaged checkpoint is lost on purpose, the one before must be resumed from
    if p["restart"] == "kill":
        return one_run(ctx, fault, spec=fault.point, act=act, retries=1, floor=newest - EVERY, spared=(newest,))
    return one_run(ctx, fault, spec=fault.point, act=act, restarts=1, floor=p["step"])


# ---------------------------------------------------------------- 12: stale leftovers and the user's own files


def kill_a_loader(ws) -> None:
    """A real trainer of the same data, held after its first step and then SIGKILLed with every process of its
    session (its resource tracker too), as srun or a cgroup's OOM killer does: its /dev/shm blocks stay behind."""
    log = ws.root / "killed-loader.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "training.main",
                str(JOB),
                *ws.job_overrides(),
                "--run-dir",
                str(ws.root / "killed-loader"),
            ],
            cwd=ws.root,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=ws.env(
                "train.after_optimizer_step#1:wait", ORCH_FAULT_ONCE="", ORCH_FAULT_RELEASE=str(ws.root / "never")
            ),
            start_new_session=True,
        )
    try:
        wait_for(lambda: "[orch fault]" in log.read_text(), "the loader to be held", 300)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def draw_leftovers(rng: random.Random, executor: str) -> Fault:
    return Fault(
        12,
        0,
        "local",
        "model.build#1:wait",
        {"tmp_step": EVERY * rng.randint(1, 5), "user_step": rng.choice([4, 100, 24])},
    )


def run_leftovers(fault: Fault, ctx: Context) -> Outcome:
    """Before the run trains: /dev/shm blocks of a killed loader of the same data, a `.tmp-step_*` of an
    interrupted save, and the user's own `step_N.bak` folder, a note in checkpoints/ and a /dev/shm file. The run
    must not crash, must remove the first two, and must leave the user's files alone."""
    p = fault.params
    user = {}

    def setup(ws):
        kill_a_loader(ws)
        user["shm"] = Path("/dev/shm") / f"chaos-user-{fault.seed}"
        user["shm"].write_text("the user's own shared memory\n")

    def act(ws, watch, run_id, out):
        watch.wait("fault", run_id)
        checkpoints = Path(ws.run(run_id).run_dir) / "checkpoints"
        tmp = checkpoints / f".tmp-{checkpoint_name(p['tmp_step'])}"
        (tmp / "model").mkdir(parents=True)
        (tmp / "model" / "half-written.safetensors").write_bytes(b"\0" * 1000)
        bak = checkpoints / f"{checkpoint_name(p['user_step'])}.bak"
        bak.mkdir()
        (bak / "notes.txt").write_text("the user's copy\n")
        (checkpoints / "README.txt").write_text("the user's note\n")
        user["files"] = [bak / "notes.txt", checkpoints / "README.txt", user["shm"]]
        ws.release()
        ws.wait_finished(run_id)
        for path in user["files"]:
            if not path.is_file():
                out.wrong_state = True
                out.notes.append(f"the user's {path} was deleted")
        if tmp.exists():
            out.leftovers += 1
        return None

    def teardown(ws):
        user.get("shm") and user["shm"].unlink(missing_ok=True)

    return one_run(ctx, fault, spec=fault.point, act=act, setup=setup, teardown=teardown)
