"""The ways a run used to lose data or run twice, each made to happen on purpose and checked: at named fault
points (jobspec/faults.py), never by timing. Real trainers, real supervisors, real files."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from jobspec.contract import RunFolder, save_seconds, trainer_exit
from jobspec.processes import same_process
from jobspec.run_lock import RunLock, holder
from orchestrator.registry import Registry
from tests.conftest import REPO, env_for, tiny_overrides
from training.checkpoint import find_resumable, prune, save_checkpoint, step_dirs, verify

pytestmark = pytest.mark.slow
JOB = str(REPO / "jobs" / "pretrain.yaml")


def trainer(run_dir: Path, data_dir: str, *extra: str, fault: str = "", check: bool = True):
    env = dict(env_for(run_dir.parent), ORCH_FAULT=fault)
    result = subprocess.run(
        [sys.executable, "-m", "training.main", JOB, *tiny_overrides(data_dir, *extra), "--run-dir", str(run_dir)],
        cwd=run_dir.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def orch(tmp_path: Path, *args: str, fault: str = "", timeout: float = 600):
    env = dict(env_for(tmp_path), ORCH_FAULT=fault)
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def submit(tmp_path: Path, data_dir: str, *extra: str, fault: str = "") -> tuple[str, Registry]:
    result = orch(
        tmp_path,
        "submit",
        JOB,
        *tiny_overrides(data_dir, f"runs_dir={tmp_path / 'runs'}", "executor=local", *extra),
        fault=fault,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.split()[1], Registry(tmp_path / ".orch" / "registry.db")


def wait_for(predicate, what: str, timeout: float = 300):
    """Poll real state (registry rows, files) until `predicate` holds."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)
    return value


def saved_steps(run_dir) -> list[int]:
    return sorted(int(p.name.split("_")[1]) for p in step_dirs(Path(run_dir) / "checkpoints"))


def tiny_model():
    from model.config import GPTConfig
    from model.gpt import GPT

    model = GPT(GPTConfig(vocab_size=128, n_layer=1, n_head=2, d_model=16, max_seq_len=16))
    model.init_weights(seed=0)
    return model, torch.optim.AdamW(model.parameters())


# ---------------------------------------------------------------- checkpoints: never lose the newest good one


def test_a_saved_step_is_never_written_again(tmp_path):
    model, opt = tiny_model()
    first = save_checkpoint(tmp_path, 5, model, opt, {"step": 5})
    saved = checkpoint_tensors(first)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    again = save_checkpoint(tmp_path, 5, model, opt, {"step": 5})  # e.g. a stop signal on a checkpoint step
    assert again == first and verify(first) is None
    after = checkpoint_tensors(first)
    assert all(torch.equal(saved[k], after[k]) for k in saved), "the committed step was written again"


def test_stopping_on_a_checkpoint_step_saves_it_once_and_a_kill_then_loses_nothing(tmp_path, tiny_data):
    run = tmp_path / "run"
    # SIGTERM arrives at step 4, a checkpoint step; a second save of step 4 would be killed mid-commit
    stopped = trainer(
        run,
        tiny_data,
        "train.max_steps=8",
        "checkpoint.every=4",
        fault="train.after_optimizer_step#4:sigterm,checkpoint.commit#2:kill",
        check=False,
    )
    assert stopped.returncode == 3, stopped.stdout[-2000:] + stopped.stderr[-2000:]
    assert stopped.stdout.count("checkpoint saved") <= 1 and saved_steps(run) == [4]
    assert verify(run / "checkpoints" / "step_00000004") is None
    resumed = trainer(run, tiny_data, "train.max_steps=8", "checkpoint.every=4")
    assert "resumed from" in resumed.stdout and "step_00000004" in resumed.stdout


def test_prune_ignores_a_users_folder_and_never_counts_a_damaged_checkpoint(tmp_path):
    model, opt = tiny_model()
    root = tmp_path / "checkpoints"
    (root / "step_00000100.bak").mkdir(parents=True)  # a user's copy: not ours, never touched
    for step in (100, 200, 300):
        save_checkpoint(tmp_path, step, model, opt, {"step": step}, keep_last=3)
    shard = sorted((root / "step_00000300" / "model").glob("*.safetensors"))[0]
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    newest_good = save_checkpoint(tmp_path, 210, model, opt, {"step": 210}, keep_last=1)
    assert newest_good.is_dir() and verify(newest_good) is None, "the checkpoint just written was pruned"
    assert (root / "step_00000300").is_dir(), "a damaged checkpoint is kept for a person, not deleted"
    assert (root / "step_00000100.bak").is_dir()
    assert find_resumable(tmp_path, set_damaged_aside=True) == newest_good
    assert (root / "step_00000300.corrupt").is_dir() and not (root / "step_00000300").exists()
    assert "skipped on resume" in (root / "step_00000300.corrupt" / "WHY_SET_ASIDE.txt").read_text()


def test_prune_keeps_keep_last_complete_checkpoints(tmp_path):
    model, opt = tiny_model()
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, model, opt, {"step": step}, keep_last=5)
    assert prune(tmp_path / "checkpoints", keep_last=2, keep_every=0) == [tmp_path / "checkpoints" / "step_00000001"]
    with pytest.raises(Exception, match="keep_last"):
        prune(tmp_path / "checkpoints", keep_last=0, keep_every=0)


@pytest.mark.parametrize(
    "point", ["checkpoint.shard_write", "checkpoint.manifest", "checkpoint.commit", "checkpoint.prune"]
)
def test_a_kill_in_any_save_phase_keeps_the_newest_committed_checkpoint(tmp_path, tiny_data, point):
    run = tmp_path / "run"
    # keep_last=1: the 2nd save (step 4) is killed; step 2 must still be there and whole
    nth = 10 if point == "checkpoint.shard_write" else 2  # a save writes 8 shard files here: #10 is in the 2nd
    killed = trainer(
        run,
        tiny_data,
        "train.max_steps=6",
        "checkpoint.every=2",
        "checkpoint.keep_last=1",
        fault=f"{point}#{nth}:kill",
        check=False,
    )
    assert killed.returncode == 137
    good = [s for s in saved_steps(run) if verify(run / "checkpoints" / f"step_{s:08d}") is None]
    assert good and good[-1] >= 2, (point, saved_steps(run))
    resumed = trainer(run, tiny_data, "train.max_steps=6", "checkpoint.every=2", "checkpoint.keep_last=1")
    assert "resumed from" in resumed.stdout
    assert not list((run / "checkpoints").glob(".tmp-*")), "an interrupted save left its folder behind"
    assert saved_steps(run) == [6]


def test_a_kill_in_the_middle_of_pruning_never_leaves_a_half_deleted_checkpoint(tmp_path, tiny_data):
    run = tmp_path / "run"
    # keep_last=1: saving step 4 prunes step 2, and the trainer is killed after the 2nd of its files is removed
    killed = trainer(
        run,
        tiny_data,
        "train.max_steps=6",
        "checkpoint.every=2",
        "checkpoint.keep_last=1",
        fault="checkpoint.trash_remove#2:kill",
        check=False,
    )
    assert killed.returncode == 137, killed.stdout[-2000:] + killed.stderr[-2000:]
    assert saved_steps(run) == [4] and verify(run / "checkpoints" / "step_00000004") is None
    assert (run / "checkpoints" / ".trash-step_00000002").is_dir(), "the half-removed folder kept its step_N name"
    resumed = trainer(run, tiny_data, "train.max_steps=6", "checkpoint.every=2", "checkpoint.keep_last=1")
    assert "resumed from" in resumed.stdout and "removed .trash-step_00000002" in resumed.stdout
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000006"]


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint(tmp_path, tiny_data):
    run = tmp_path / "run"
    full = trainer(
        run, tiny_data, "train.max_steps=6", "checkpoint.every=2", fault="checkpoint.shard_write#10:enospc", check=False
    )
    assert full.returncode == 2 and "is full" in full.stderr, full.stderr[-2000:]
    assert saved_steps(run) == [2] and verify(run / "checkpoints" / "step_00000002") is None
    assert (run / "config.yaml").read_text().strip(), "config.yaml intact"


# ---------------------------------------------------------------- non-finite steps


def test_a_nan_loss_skips_its_step_and_is_counted(tmp_path, tiny_data):
    run = tmp_path / "run"
    trainer(run, tiny_data, "train.max_steps=6", "train.log_every=1", fault="train.loss#3:nan")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    skipped = {r["step"]: r["skipped_steps"] for r in records if "skipped_steps" in r}
    assert skipped[2] == 0 and skipped[3] == 1 and skipped[6] == 1
    weights = torch.cat([t.flatten() for t in checkpoint_tensors(run / "checkpoints" / "step_00000006").values()])
    assert torch.isfinite(weights).all()


def test_a_diverging_run_stops_with_a_user_error_and_never_saves_nan(tmp_path, tiny_data):
    run = tmp_path / "run"
    result = trainer(
        run,
        tiny_data,
        "train.max_steps=40",
        "checkpoint.every=1",
        "optim.lr=1e30",
        "optim.warmup_steps=1",
        "train.max_nonfinite_steps=3",
        "optim.grad_clip=0",
        check=False,
    )
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "not finite" in (run / "logs" / "user_error.txt").read_text()
    for step in saved_steps(run):
        for name, t in checkpoint_tensors(run / "checkpoints" / f"step_{step:08d}").items():
            assert torch.isfinite(t).all(), (step, name)


def checkpoint_tensors(path: Path) -> dict[str, torch.Tensor]:
    from training.run_folder import read_checkpoint_model

    return read_checkpoint_model(path)


# ---------------------------------------------------------------- one trainer per run folder


def test_a_second_trainer_on_a_busy_run_folder_is_refused(tmp_path, tiny_data):
    run = tmp_path / "run"
    env = dict(env_for(tmp_path), ORCH_FAULT="train.after_optimizer_step#2:hang")
    first = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "training.main",
            JOB,
            *tiny_overrides(tiny_data, "train.max_steps=5"),
            "--run-dir",
            str(run),
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        for line in first.stdout:  # it holds the lock from start-up; the fault line says it is now hanging
            if line.startswith("[orch fault]"):
                break
        second = trainer(run, tiny_data, "train.max_steps=5", check=False)
        assert second.returncode == 2 and "in use by another trainer" in second.stderr
        assert f"pid {first.pid}" in second.stderr
        assert not (run / "logs" / "user_error.txt").exists(), "the refused trainer wrote into the busy run's folder"
    finally:
        first.kill()
        first.wait()


def test_a_trainer_refused_under_torchrun_records_a_user_error_exit(tmp_path, tiny_data):
    """torchrun reports any failure as 1: the refused rank 0's own code (2, don't retry) must reach the executor."""
    run = tmp_path / "run"
    with RunLock(run):  # a trainer the executor doesn't know of holds the folder
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc_per_node=2",
                "-m",
                "training.main",
                JOB,
                *tiny_overrides(tiny_data, "train.max_steps=2"),
                "--run-dir",
                str(run),
            ],
            cwd=tmp_path,
            env=env_for(tmp_path),
            capture_output=True,
            text=True,
            timeout=600,
        )
    assert result.returncode == 1 and "in use by another trainer" in result.stderr, result.stderr[-3000:]
    assert trainer_exit(RunFolder(run)) == 2
    assert not (run / "logs" / "user_error.txt").exists(), "the refused trainer wrote a sentence into a busy folder"


def test_a_second_trainer_is_refused_while_another_node_of_the_first_lives(tmp_path, tiny_data):
    """Two nodes (each rank its node's local rank 0); rank 0 is lost, rank 1 still runs: the folder is not free."""
    run = tmp_path / "run"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ranks = []
    for rank in (0, 1):
        env = dict(
            env_for(tmp_path),
            RANK=str(rank),
            WORLD_SIZE="2",
            LOCAL_RANK="0",
            LOCAL_WORLD_SIZE="1",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            ORCH_FAULT="run_lock.held@1:hang",
        )
        ranks.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "training.main",
                    JOB,
                    *tiny_overrides(tiny_data, "train.max_steps=5"),
                    "--run-dir",
                    str(run),
                ],
                cwd=tmp_path,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    try:
        for line in ranks[1].stdout:  # rank 1 holds the folder with rank 0 once it gets here
            if line.startswith("[orch fault] run_lock.held"):
                break
        else:
            pytest.fail("rank 1 never reached the point where it holds the run folder")
        ranks[0].kill()  # rank 0's node is lost
        ranks[0].wait()
        second = trainer(run, tiny_data, "train.max_steps=5", check=False)
        assert second.returncode == 2 and "in use by another trainer" in second.stderr, second.stderr[-2000:]
    finally:
        for proc in ranks:
            proc.kill()
            proc.wait()


def test_a_file_system_without_flock_is_a_user_error_naming_the_requirement(tmp_path, tiny_data):
    run = tmp_path / "run"
    result = trainer(run, tiny_data, "train.max_steps=2", fault="run_lock.flock:enolck", check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    said = (run / "logs" / "user_error.txt").read_text()
    assert "does not support flock" in said and "docs/reliability.md" in said and str(run / ".lock") in said
    assert trainer_exit(RunFolder(run)) == 2


def test_cancel_then_resume_at_once_never_runs_two_trainers(tmp_path, tiny_data, monkeypatch):
    release = tmp_path / "release"
    monkeypatch.setenv("ORCH_FAULT_RELEASE", str(release))  # the trainer's stop-save waits until we say so
    run_id, registry = submit(
        tmp_path, tiny_data, "train.max_steps=100000", "checkpoint.every=0", fault="checkpoint.manifest#1:wait"
    )
    run_dir = registry.get(run_id).run_dir
    wait_for(lambda: (Path(run_dir) / "metrics.jsonl").exists(), "training to start")
    assert orch(tmp_path, "cancel", run_id, "--no-wait").returncode == 0
    wait_for(
        lambda: "[orch fault] checkpoint.manifest" in (Path(run_dir) / "logs" / "train.log").read_text(),
        "the trainer to be saving",
    )
    refused = orch(tmp_path, "resume", run_id)  # the trainer is still saving
    assert refused.returncode == 2 and "CANCELLING" in refused.stderr, refused.stdout + refused.stderr
    release.touch()
    wait_for(lambda: registry.get(run_id).state == "CANCELLED", "the cancel to finish")
    assert registry.get(run_id).exit_code == 3  # the trainer saved and stopped; nobody restarted it
    log = (Path(run_dir) / "logs" / "train.log").read_text()
    assert "attempt 2" not in log and log.count("resumed from") == 0
    resumed = orch(tmp_path, "resume", run_id)
    assert resumed.returncode == 0, resumed.stderr
    assert orch(tmp_path, "cancel", run_id).returncode == 0
    wait_for(lambda: registry.get(run_id).state == "CANCELLED", "the second cancel")


def test_two_resumes_at_once_start_one_trainer(tmp_path, tiny_data):
    run_id, registry = submit(tmp_path, tiny_data, "train.max_steps=3")
    wait_for(lambda: registry.get(run_id).finished, "the run to finish")
    env = dict(env_for(tmp_path))
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "orchestrator.cli", "resume", run_id],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    codes = sorted(p.wait(timeout=120) for p in procs)
    assert codes == [0, 2], [p.stderr.read() for p in procs]
    wait_for(lambda: registry.get(run_id).finished, "the resumed run to finish")
    assert registry.get(run_id).state == "COMPLETED"


# ---------------------------------------------------------------- supervisors


def test_a_killed_supervisor_shows_as_lost_and_resume_finishes_the_run(tmp_path, tiny_data):
    run_id, registry = submit(
        tmp_path, tiny_data, "train.max_steps=60", "checkpoint.every=5", fault="train.after_optimizer_step#7:hang"
    )
    run = registry.get(run_id)
    wait_for(
        lambda: (
            "[orch fault]" in (Path(run.run_dir) / "logs" / "train.log").read_text()
            if (Path(run.run_dir) / "logs" / "train.log").exists()
            else False
        ),
        "the trainer to reach step 7",
    )
    trainer = json.loads((Path(run.run_dir) / ".lock").read_text())
    os.kill(run.pid, signal.SIGKILL)  # the supervisor; its trainer follows it (SIGTERM from the kernel) ...
    os.kill(trainer["pid"], signal.SIGKILL)  # ... unless hung
    wait_for(lambda: same_process(run.pid, run.pid_start) is False, "the supervisor to be gone")
    wait_for(
        lambda: holder(run.run_dir) is None, "the trainer to be gone (a dying process holds its lock until it exits)"
    )
    listing = orch(tmp_path, "runs").stdout
    assert any(line.startswith(run_id) and " LOST " in line for line in listing.splitlines()), listing
    assert registry.get(run_id).state == "RUNNING", "looking must not change the registry"
    resumed = orch(tmp_path, "resume", run_id, "--follow")
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout and registry.get(run_id).state == "COMPLETED"


@pytest.mark.parametrize("nproc", [1, 2])  # 2: under torchrun, whose own exit code is 1 for any rank's non-zero
def test_the_supervisor_requeues_a_trainer_stopped_by_a_signal_without_burning_a_retry(tmp_path, tiny_data, nproc):
    run_id, registry = submit(
        tmp_path,
        tiny_data,
        "train.max_steps=10",
        "checkpoint.every=5",
        "resources.max_retries=0",
        "resources.max_requeues=1",
        f"resources.nproc_per_node={nproc}",
        fault="train.after_optimizer_step#6:sigusr2",
    )
    wait_for(lambda: registry.get(run_id).finished, "the run to finish")
    run = registry.get(run_id)
    assert run.state == "COMPLETED" and run.attempts == 2, run
    log = (Path(run.run_dir) / "logs" / "train.log").read_text()
    assert "requeued after a stop signal (1 of 1)" in log and "resumed from" in log


def test_a_stop_signal_to_the_process_group_saves_with_data_loader_workers(tmp_path, tiny_data):
    """torchrun and Slurm signal a trainer's whole process group, its data loader's workers included."""
    run, release = tmp_path / "run", tmp_path / "release"
    env = dict(env_for(tmp_path), ORCH_FAULT="train.after_optimizer_step#3:wait", ORCH_FAULT_RELEASE=str(release))
    overrides = tiny_overrides(tiny_data, "train.max_steps=10", "checkpoint.every=0", "data.num_workers=1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "training.main", JOB, *overrides, "--run-dir", str(run)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )  # its own process group, as torchrun starts each rank
    try:
        out = []
        for line in proc.stdout:  # the workers are running; the trainer waits inside step 3
            out.append(line)
            if line.startswith("[orch fault]"):
                break
        os.killpg(proc.pid, signal.SIGTERM)
        release.touch()
        out.append(proc.stdout.read())
        assert proc.wait(timeout=300) == 3, "".join(out)[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert saved_steps(run) == [3] and verify(run / "checkpoints" / "step_00000003") is None
    assert save_seconds(RunFolder(run)) > 0, "the save was not timed for the launchers' grace"


def test_a_time_budget_counts_across_a_requeue(tmp_path, tiny_data):
    run = tmp_path / "run"
    stopped = trainer(
        run,
        tiny_data,
        "train.max_steps=1000",
        "checkpoint.every=0",
        "train.time_budget_min=100",
        fault="train.after_optimizer_step#5:sigterm",
        check=False,
    )
    assert stopped.returncode == 3
    used = json.loads((run / "checkpoints" / "step_00000005" / "trainer_state.json").read_text())["budget_used_s"]
    assert used > 0
    budget_min = used / 60 / 2  # already spent before the restart: the resumed run stops after one step
    resumed = trainer(
        run, tiny_data, "train.max_steps=1000", "checkpoint.every=0", f"train.time_budget_min={budget_min}"
    )
    assert f"train.time_budget_min={budget_min} reached at step 6" in resumed.stdout


# ---------------------------------------------------------------- model-generated code


def test_candidate_code_runs_confined(tmp_path):
    from training.evaluate.sandbox import run_untrusted

    here = Path.cwd()
    written = run_untrusted("open('pwned', 'w').write('x'); import os; print(os.getcwd())")
    assert written.returncode == 0 and not (here / "pwned").exists()
    assert not Path(written.stdout.decode().strip()).exists(), "its working folder is removed afterwards"
    slow = run_untrusted("import subprocess, time\nsubprocess.Popen(['sleep', '300'])\ntime.sleep(300)", timeout_s=2)
    assert slow.timed_out
    left = subprocess.run(["pgrep", "-x", "sleep", "-a"], capture_output=True, text=True).stdout
    assert "sleep 300" not in left, "a child outlived the timeout"
    assert run_untrusted("x = bytearray(4 << 30)").returncode != 0  # the address-space limit


def test_task_templates_render_in_a_sandbox(tmp_path):
    from training.evaluate.tasks import EvalError, _render

    assert _render("{{ a }} + {{ b }}", {"a": 1, "b": 2}, tmp_path / "t.yaml", "doc_to_text") == "1 + 2"
    with pytest.raises(EvalError, match="doc_to_text"):
        _render("{{ ''.__class__.__mro__[1].__subclasses__() }}", {}, tmp_path / "t.yaml", "doc_to_text")
