"""The Slurm executor on the real local cluster (slurm/cluster.sh): multi-node jobs, and runs that survive
their time limit, `scontrol requeue` and a SIGKILLed task, ending with the same weights as a run never
interrupted.

Jobs go through `orch submit ... executor=slurm`; states come from the registry, refreshed from sacct by
`orchestrator.executors.slurm.SlurmExecutor.refresh`. Synchronisation is by polling sacct, the registry and the files
the jobs write, each with a bounded timeout. Skipped without root (no cluster), failed under CI=true.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, env_for, tiny_overrides
from test_slurm_cluster import slurm_cluster, wait_until  # noqa: F401  (the session fixture)

from orchestrator.executors import slurm
from orchestrator.registry import Registry, Run

pytestmark = pytest.mark.slurm

JOB = str(REPO / "jobs" / "pretrain.yaml")
EXACT = ["train.deterministic=true", "train.dtype=fp32"]  # so a resumed run can match an uninterrupted one


def registry_for(tmp: Path) -> Registry:
    return Registry(tmp / ".orch" / "registry.db")


def orch(tmp: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args],
        cwd=tmp,
        env=env_for(tmp),
        capture_output=True,
        text=True,
        timeout=120,
    )
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def submit(tmp: Path, data_dir: str, name: str, *extra: str) -> Run:
    orch(
        tmp,
        "submit",
        JOB,
        *tiny_overrides(data_dir, *EXACT, *extra),
        "executor=slurm",
        f"name={name}",
        f"runs_dir={tmp / 'runs'}",
    )
    run = next(r for r in registry_for(tmp).list() if r.name == name)
    assert run.executor == "slurm" and run.slurm_job_id and run.state == "PENDING", run
    return run


def wait_finished(tmp: Path, run: Run, timeout: float) -> Run:
    registry = registry_for(tmp)

    def finished():
        slurm.SlurmExecutor(registry).refresh([registry.get(run.id)])
        current = registry.get(run.id)
        return current if current.finished else None

    return wait_until(finished, timeout, f"run {run.id} (Slurm job {run.slurm_job_id}) to finish", interval=2)


def sacct_history(job_id: str) -> list[str]:
    """The job's state at each start, oldest first (e.g. ["REQUEUED", "COMPLETED"])."""
    return [r["State"].split()[0] for r in slurm.sacct_records([job_id]).get(job_id, [])]


def log_of(run: Run) -> str:
    path = slurm.log_file(run)
    return path.read_text(errors="replace") if path else ""


def final_weights(run_dir: str) -> dict:
    from safetensors.torch import load_file

    from training.checkpoint import find_resumable

    ckpt = find_resumable(Path(run_dir))
    assert ckpt is not None, f"no checkpoint in {run_dir}"
    tensors = {}
    for f in sorted((Path(ckpt) / "model").glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def assert_same_weights(run_dir: str, reference_dir: str) -> None:
    import torch

    got, want = final_weights(run_dir), final_weights(reference_dir)
    assert got.keys() == want.keys()
    differing = [k for k in want if not torch.equal(got[k], want[k])]
    assert not differing, (
        f"{len(differing)} of {len(want)} tensors differ from the uninterrupted run, e.g. {differing[:3]}"
    )


def checkpoint_steps(run_dir: str) -> list[int]:
    folder = Path(run_dir) / "checkpoints"
    return sorted(int(p.name.split("_")[1]) for p in folder.glob("step_*")) if folder.is_dir() else []


def task_pid(job_id: str) -> int | None:
    """The pid of the job's rank-0 srun task (submitit's runner, in which the trainer runs)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if (
            b"submitit.core._submit" in cmdline
            and f"SLURM_JOB_ID={job_id}".encode() in environ
            and b"SLURM_PROCID=0" in environ
            and any(e.startswith(b"SLURM_STEP_ID=") for e in environ)
        ):
            return int(entry.name)
    return None


# ------------------------------------------------------------------ the batch script and its decisions (no cluster)


def test_batch_script_asks_for_the_resources(tmp_path):
    from submitit.slurm.slurm import _make_sbatch_string

    from jobspec import load_spec

    cfg = load_spec(
        JOB,
        [
            "resources.nodes=3",
            "resources.nproc_per_node=4",
            "resources.gpus_per_node=4",
            "resources.cpus_per_task=8",
            "resources.mem_gb=64",
            "resources.time_min=120",
            "resources.partition=gpu",
            "resources.account=proj",
            "resources.qos=high",
            "resources.constraint=h100",
            "resources.sbatch_extra=[--exclusive,--reservation=r1]",
        ],
    )
    run = Run(
        id="pretrain-abc123",
        name="pretrain",
        kind="pretrain",
        executor="slurm",
        state="PENDING",
        run_dir=str(tmp_path / "run"),
        created_at=0.0,
    )
    params = slurm.executor_parameters(run, cfg.resources, dependency_job_ids=["11", "12"])
    script = _make_sbatch_string(command="python -m submitit.core._submit FOLDER", folder=tmp_path, **params)
    for line in [
        "--nodes=3",
        "--ntasks-per-node=4",
        "--gpus-per-node=4",
        "--cpus-per-task=8",
        "--mem=64G",
        "--time=120",
        "--partition=gpu",
        "--account=proj",
        "--qos=high",
        "--constraint=h100",
        "--dependency=afterok:11:12",
        "--signal=USR2@300",
        "--requeue",
        "--exclusive",
        "--reservation=r1",
        "--job-name=pretrain-abc123",
    ]:
        assert f"#SBATCH {line}\n" in script, (line, script)
    srun = next(line for line in script.splitlines() if line.startswith("srun "))
    assert "--kill-on-bad-exit=1" in srun and "torchrun" not in script
    after = script.split("python -m submitit.core._submit FOLDER", 1)[1]
    assert "ORCH_SRUN_STATUS=$?" in after and "orchestrator.executors.slurm_job after-srun" in after
    assert slurm.signal_delay_s(1) == 15 and slurm.signal_delay_s(600) == 300


def test_bad_sbatch_extra_names_the_key_and_value():
    with pytest.raises(ValueError, match=r"resources.sbatch_extra has the value 'exclusive'"):
        slurm.sbatch_extra_parameters(["exclusive"])


def _run_dir_for_after_srun(tmp_path: Path, *overrides: str) -> Path:
    from omegaconf import OmegaConf

    from jobspec import load_spec

    run_dir = tmp_path / "run"
    (run_dir / "slurm").mkdir(parents=True)
    OmegaConf.save(load_spec(JOB, list(overrides)), run_dir / "config.yaml")
    return run_dir


def test_after_srun_ends_the_job_when_done_on_user_errors_and_when_allowances_are_used_up(tmp_path, monkeypatch):
    """The branches that end the job (the requeueing ones run on the cluster, in the tests below)."""
    from jobspec.contract import USER_ERROR
    from orchestrator.executors import slurm_job

    monkeypatch.setenv("SLURM_JOB_ID", "999999")
    run_dir = _run_dir_for_after_srun(tmp_path, "resources.max_requeues=0", "resources.max_retries=0")
    (run_dir / "slurm" / slurm_job.TRAINER_EXIT).write_text("0\n")
    assert slurm_job.after_srun(0, run_dir) == 0
    assert not (run_dir / "slurm" / slurm_job.TRAINER_EXIT).exists()

    (run_dir / "slurm" / slurm_job.TRAINER_EXIT).write_text("3\n")
    assert slurm_job.after_srun(3, run_dir) == 3
    reason = (run_dir / "slurm" / slurm_job.FINAL_REASON).read_text()
    assert "stopped by a signal" in reason and "max_requeues=0 used up" in reason

    assert slurm_job.after_srun(137, run_dir) == 137  # a task SIGKILLed: no trainer exit code
    assert "srun exit code 137" in (run_dir / "slurm" / slurm_job.FINAL_REASON).read_text()
    assert not (run_dir / "slurm" / slurm_job.RESTARTS).exists()  # nothing requeued

    run_dir2 = _run_dir_for_after_srun(tmp_path / "2", "resources.max_retries=5")
    (run_dir2 / "logs").mkdir()
    (run_dir2 / "logs" / USER_ERROR).write_text("data.dir: no prepared train split\n")
    assert slurm_job.after_srun(2, run_dir2) == 2  # a user error is not retried, allowances or not
    assert not (run_dir2 / "slurm" / slurm_job.RESTARTS).exists()


# --------------------------------------------------------------------------------------------- multi-node


def test_two_nodes_two_tasks_each_train_and_complete(slurm_cluster, tiny_data, tmp_path):  # noqa: F811  (the fixture, imported above)
    """nodes=2 x nproc_per_node=2: four gloo ranks over two Slurm nodes (tp=2 x dp_shard=2)."""
    cpus = sum(n["cpus"] for n in slurm_cluster["nodes"].values())
    assert cpus >= 4, f"the cluster has {cpus} CPUs; 2 nodes x 2 tasks x 1 CPU need 4 (ORCH_SLURM_NODE_CPUS)"
    run = submit(
        tmp_path,
        tiny_data,
        "multinode",
        "resources.nodes=2",
        "resources.nproc_per_node=2",
        "resources.cpus_per_task=1",
        "parallel.tp=2",
        "train.max_steps=10",
        "checkpoint.every=5",
    )
    script = (Path(run.run_dir) / "slurm" / f"{run.slurm_job_id}_submission.sh").read_text()
    assert "#SBATCH --nodes=2" in script and "#SBATCH --ntasks-per-node=2" in script

    done = wait_finished(tmp_path, run, timeout=240)
    assert done.state == "COMPLETED", (done, log_of(done))
    assert sacct_history(run.slurm_job_id) == ["COMPLETED"]
    assert checkpoint_steps(run.run_dir) == [5, 10]
    nodes = subprocess.run(
        ["sacct", "-n", "-X", "-P", "-j", run.slurm_job_id, "-o", "NodeList"], capture_output=True, text=True
    ).stdout.strip()
    assert nodes == "node[1-2]", nodes
    log = orch(tmp_path, "logs", run.id).stdout  # rank 0's submitit log
    assert "world 4 = dp_replicate 1 x dp_shard 2 x tp 2" in log, log
    assert "global_rank=0(4)" in log and "node=0(2)" in log, log
    assert json.loads((Path(run.run_dir) / "summary.json").read_text())["step"] == 10
    listing = orch(tmp_path, "runs").stdout
    assert any(line.startswith(run.id) and " COMPLETED " in line for line in listing.splitlines()), listing


# ------------------------------------------------------------------------- interrupted runs vs. uninterrupted


def _measure_steps_per_s(data_dir: str, tmp: Path) -> float:
    """This machine's speed on the tiny job now, to size the runs in seconds rather than steps."""
    run_dir = tmp / "calibrate"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "training.main",
            JOB,
            *tiny_overrides(data_dir, *EXACT),
            "train.max_steps=150",
            "checkpoint.every=0",
            "--run-dir",
            str(run_dir),
        ],
        cwd=tmp,
        env=env_for(tmp),
        check=True,
        capture_output=True,
        timeout=300,
    )
    summary = json.loads((run_dir / "summary.json").read_text())
    return summary["step"] / max(summary["train_minutes"] * 60, 1e-3)


@pytest.fixture(scope="module")
def interrupted_runs(slurm_cluster, tiny_data, tmp_path_factory):  # noqa: F811  (the fixture, imported above)
    """Sizes, and the uninterrupted reference runs (local processes) started in the background:
    - long: 45 s of training at today's speed, more than one start of a job with time_min=1 can do (the
      SIGUSR2 warning comes 15-45 s after the start);
    - short: a dozen seconds, long enough to interrupt after its first checkpoint.
    Also submits the time-limited job now, so it runs while the other tests interrupt theirs."""
    tmp = tmp_path_factory.mktemp("interrupted")
    rate = _measure_steps_per_s(tiny_data, tmp)
    long_steps = int(min(4000, max(600, rate * 45)))
    short_steps = int(min(1500, max(200, rate * 12)))
    sizes = {
        "long": [f"train.max_steps={long_steps}", f"checkpoint.every={long_steps // 4}"],
        "short": [f"train.max_steps={short_steps}", f"checkpoint.every={short_steps // 8}"],
    }
    references = {}
    for size, extra in sizes.items():
        run_dir = tmp / f"reference-{size}"
        log = open(tmp / f"reference-{size}.log", "wb")
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "training.main",
                JOB,
                *tiny_overrides(tiny_data, *EXACT, *extra),
                "--run-dir",
                str(run_dir),
            ],
            cwd=tmp,
            env=env_for(tmp),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        references[size] = (proc, run_dir)
    time_limited = submit(
        tmp,
        tiny_data,
        "timelimit",
        *sizes["long"],
        "resources.time_min=1",
        "resources.max_requeues=12",
        "resources.max_retries=3",
    )

    def reference(size: str) -> str:
        proc, run_dir = references[size]
        assert proc.wait(timeout=600) == 0, (tmp / f"reference-{size}.log").read_text()
        return str(run_dir)

    yield {"tmp": tmp, "sizes": sizes, "reference": reference, "time_limited": time_limited}
    for proc, _ in references.values():
        if proc.poll() is None:
            proc.kill()
    registry = registry_for(tmp)
    for run in registry.list():  # a failed test leaves no job behind
        if not run.finished:
            slurm.SlurmExecutor(registry).cancel(run)


def test_scontrol_requeue_mid_run_resumes_to_the_same_weights(interrupted_runs, tiny_data):
    tmp = interrupted_runs["tmp"]
    run = submit(tmp, tiny_data, "requeued", *interrupted_runs["sizes"]["short"])
    wait_until(lambda: checkpoint_steps(run.run_dir), 180, f"{run.id}'s first checkpoint")
    subprocess.run(["scontrol", "requeue", run.slurm_job_id], check=True, capture_output=True)

    done = wait_finished(tmp, run, timeout=240)
    assert done.state == "COMPLETED", (done, log_of(done))
    assert sacct_history(run.slurm_job_id) == ["REQUEUED", "COMPLETED"]
    assert done.attempts == 2
    assert "resumed from" in log_of(done)
    assert_same_weights(run.run_dir, interrupted_runs["reference"]("short"))


def test_sigkilled_task_is_retried_and_resumes_to_the_same_weights(interrupted_runs, tiny_data):
    tmp = interrupted_runs["tmp"]
    run = submit(tmp, tiny_data, "killed", *interrupted_runs["sizes"]["short"], "resources.max_retries=1")
    wait_until(lambda: checkpoint_steps(run.run_dir), 180, f"{run.id}'s first checkpoint")
    pid = wait_until(lambda: task_pid(run.slurm_job_id), 30, f"the task process of job {run.slurm_job_id}")
    os.kill(pid, signal.SIGKILL)

    done = wait_finished(tmp, run, timeout=240)
    log = log_of(done)
    assert done.state == "COMPLETED", (done, log)
    assert sacct_history(run.slurm_job_id) == ["REQUEUED", "COMPLETED"]
    assert "requeueing (retry 1 of 1)" in log, log
    assert "resumed from" in log
    assert_same_weights(run.run_dir, interrupted_runs["reference"]("short"))


def test_preempted_by_a_higher_qos_resumes_to_the_same_weights(interrupted_runs, tiny_data):
    """A QOS `high` job that needs the node requeues ours (PreemptMode=REQUEUE): SIGUSR2 within GraceTime,
    checkpoint, exit 3, requeue, resume once the node is free again."""
    tmp = interrupted_runs["tmp"]
    run = submit(tmp, tiny_data, "preempted", *interrupted_runs["sizes"]["short"])
    wait_until(lambda: checkpoint_steps(run.run_dir), 180, f"{run.id}'s first checkpoint")
    node = subprocess.run(
        ["squeue", "-h", "-j", run.slurm_job_id, "-o", "%N"], capture_output=True, text=True
    ).stdout.strip()
    assert node in ("node1", "node2"), node
    # Every CPU of that node, at a higher priority: our job must make room.
    subprocess.run(
        [
            "sbatch",
            "--qos=high",
            f"--nodelist={node}",
            "--cpus-per-task=2",
            "--job-name=preemptor",
            f"--output={tmp / 'preemptor.out'}",
            "--wrap=hostname",
        ],
        check=True,
        capture_output=True,
    )

    done = wait_finished(tmp, run, timeout=240)
    log = log_of(done)
    assert done.state == "COMPLETED", (done, log)
    assert sacct_history(run.slurm_job_id) == ["REQUEUED", "COMPLETED"]
    assert "stopping on signal" in log and "resumed from" in log, log
    assert_same_weights(run.run_dir, interrupted_runs["reference"]("short"))


def test_cancel_then_resume_continues_to_the_same_weights(interrupted_runs, tiny_data):
    """`orch cancel` (scancel) ends the job CANCELLED; `orch resume` submits a new job on the same folder."""
    tmp = interrupted_runs["tmp"]
    run = submit(tmp, tiny_data, "resumed", *interrupted_runs["sizes"]["short"])
    wait_until(lambda: checkpoint_steps(run.run_dir), 180, f"{run.id}'s first checkpoint")
    assert orch(tmp, "resume", run.id, check=False).returncode == 2  # still running: refused
    orch(tmp, "cancel", run.id)
    wait_until(lambda: sacct_history(run.slurm_job_id) == ["CANCELLED"], 60, f"job {run.slurm_job_id} CANCELLED")
    registry = registry_for(tmp)
    assert registry.get(run.id).state == "CANCELLED"
    steps_before = checkpoint_steps(run.run_dir)

    orch(tmp, "resume", run.id)
    resumed = registry.get(run.id)
    assert resumed.state == "PENDING" and resumed.slurm_job_id != run.slurm_job_id, resumed
    done = wait_finished(tmp, resumed, timeout=240)
    assert done.state == "COMPLETED", (done, log_of(done))
    assert f"resumed from {run.run_dir}/checkpoints/step_{steps_before[-1]:08d}" in log_of(done)
    assert_same_weights(run.run_dir, interrupted_runs["reference"]("short"))


def test_time_limit_requeues_until_done_with_the_same_weights(interrupted_runs):
    """time_min=1 but about a minute of work: SIGUSR2 before the limit, checkpoint, requeue, resume."""
    tmp, run = interrupted_runs["tmp"], interrupted_runs["time_limited"]
    script = (Path(run.run_dir) / "slurm" / f"{run.slurm_job_id}_submission.sh").read_text()
    assert "#SBATCH --time=1" in script and f"#SBATCH --signal=USR2@{slurm.signal_delay_s(1)}" in script

    done = wait_finished(tmp, run, timeout=540)
    log = log_of(done)
    assert done.state == "COMPLETED", (done, log)
    history = sacct_history(run.slurm_job_id)
    assert len(history) >= 2 and set(history[:-1]) == {"REQUEUED"} and history[-1] == "COMPLETED", history
    assert done.attempts == len(history)
    assert f"stopping on signal {int(signal.SIGUSR2)}" in log and "requeueing (requeue 1 of 12)" in log, log
    assert_same_weights(run.run_dir, interrupted_runs["reference"]("long"))


def _finished_run(tmp: Path, data_dir: str, name: str) -> Run:
    """A Slurm run that ended FAILED, with its folder and config.yaml, as `orch resume` finds it."""
    from jobspec import load_spec

    from orchestrator.runs import register_run

    cfg = load_spec(
        JOB, [*tiny_overrides(data_dir), "executor=slurm", f"name={name}", f"runs_dir={tmp / 'runs'}"], launch=True
    )
    registry = registry_for(tmp)
    run = register_run(registry, cfg, "slurm")
    registry.update(run.id, state="FAILED", reason="failed before", ended_at=time.time())
    return registry.get(run.id)


def _jobs_named(name: str) -> list[str]:
    return subprocess.run(["squeue", "-h", "--name", name, "-o", "%i"], capture_output=True, text=True).stdout.split()


def test_resume_refuses_while_a_trainer_holds_the_run_folder(slurm_cluster, tiny_data, tmp_path):  # noqa: F811  (the fixture, imported above)
    from jobspec.run_lock import RunLock

    run = _finished_run(tmp_path, tiny_data, "held")
    try:
        with RunLock(run.run_dir):  # a trainer the registry lost track of, still holding the folder
            result = orch(tmp_path, "resume", run.id, check=False)
        assert result.returncode == 2, result.stdout + result.stderr
        assert f"{run.id} can't be resumed: a trainer still holds {run.run_dir}" in result.stderr
        assert f"pid {os.getpid()}" in result.stderr
        assert not _jobs_named(run.id), "a second trainer was queued on the folder"
        assert registry_for(tmp_path).get(run.id).state == "FAILED"
    finally:
        subprocess.run(["scancel", "--name", run.id], capture_output=True)


def test_resume_refuses_while_slurm_holds_a_job_of_the_run(slurm_cluster, tiny_data, tmp_path):  # noqa: F811  (the fixture, imported above)
    # where flock() holds on one node only, Slurm's queue is what says a trainer may still come or run
    run = _finished_run(tmp_path, tiny_data, "queued")
    job = subprocess.run(
        ["sbatch", "--parsable", "--hold", f"--job-name={run.id}", f"--output={tmp_path}/held.out", "--wrap", "true"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    try:
        result = orch(tmp_path, "resume", run.id, check=False)
        assert result.returncode == 2, result.stdout + result.stderr
        assert f"Slurm still holds a job of it ({job} PENDING)" in result.stderr
        assert _jobs_named(run.id) == [job]
        assert registry_for(tmp_path).get(run.id).state == "FAILED"
    finally:
        subprocess.run(["scancel", job], capture_output=True)
