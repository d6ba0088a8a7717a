"""Code that travels with the job (orchestrator/code_snapshot.py): a run runs the code it was submitted with,
whatever happens to the checkout afterwards, also when it is restarted, requeued or resumed.

Each test submits from a scratch copy of this checkout (its own git repository), never editing the checkout the
other tests run from.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, env_for, tiny_overrides
from test_slurm_cluster import slurm_cluster, wait_until  # noqa: F401  (the session fixture)

from jobspec import SpecError, load_spec
from orchestrator import code_snapshot
from orchestrator.code_snapshot import CODE_DIRS, MANIFEST
from orchestrator.registry import Registry

BROKEN = "\ndef broken(:  # a syntax error written after submit\n"
GIT = ["git", "-c", "user.name=orch", "-c", "user.email=orch@localhost", "-c", "commit.gpgsign=false"]


def scratch_checkout(dest: Path) -> Path:
    """The code of this checkout as `git ls-files -co --exclude-standard` lists it (uncommitted edits included),
    committed in a repository of its own."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z", "--", *CODE_DIRS],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    (dest / ".gitignore").write_text("__pycache__/\n*.pyc\n")
    subprocess.run(["git", "init", "-q", str(dest)], check=True)
    subprocess.run([*GIT, "add", "-A"], cwd=dest, check=True)
    subprocess.run([*GIT, "commit", "-q", "-m", "base"], cwd=dest, check=True)
    return dest


def head(checkout: Path) -> str:
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=checkout, capture_output=True, text=True).stdout.strip()


def orch_in(checkout: Path, tmp: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`orch` as the scratch checkout's own code runs it (`python -m` puts the current folder first)."""
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args],
        cwd=checkout,
        env=env or env_for(tmp),
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture
def checkout(tmp_path) -> Path:
    return scratch_checkout(tmp_path / "checkout")


# ---------------------------------------------------------------- the snapshot itself


def test_the_snapshot_is_content_addressed_reused_and_records_the_changes(checkout, tmp_path):
    runs = str(tmp_path / "runs")
    clean = code_snapshot.take(runs, root=checkout)
    assert clean.commit == head(checkout) and clean.diff_hash is None
    assert Path(clean.path) == tmp_path / "runs" / ".code" / clean.hash
    assert code_snapshot.take(runs, root=checkout) == clean, "the same code: the same snapshot"

    (checkout / "training" / "__pycache__" / "junk.pyc").parent.mkdir(exist_ok=True)
    (checkout / "training" / "__pycache__" / "junk.pyc").write_bytes(b"ignored")
    assert code_snapshot.take(runs, root=checkout) == clean, "ignored files are not code"

    (checkout / "training" / "trainer.py").write_text((checkout / "training" / "trainer.py").read_text() + "# edit\n")
    edited = code_snapshot.take(runs, root=checkout)
    assert edited.hash != clean.hash and edited.commit == clean.commit and edited.diff_hash
    (checkout / "training" / "extra.py").write_text("X = 1\n")  # untracked, not ignored: it travels too
    untracked = code_snapshot.take(runs, root=checkout)
    assert untracked.diff_hash not in (None, edited.diff_hash)
    snap = Path(untracked.path)
    assert (snap / "training" / "extra.py").read_text() == "X = 1\n"
    assert (snap / "training" / "trainer.py").read_text().endswith("# edit\n")
    assert (snap / "jobs" / "pretrain.yaml").is_file() and (snap / "slurm" / "cluster.sh").is_file()
    assert not list(snap.rglob("*.pyc")) and not (snap / "tests").exists()
    assert not (snap / "jobspec" / "schema.py").stat().st_mode & 0o222, "read-only: nobody edits a run's code"
    assert not list((tmp_path / "runs" / ".code").glob(".tmp-*")), "no temporary folder left"

    again = code_snapshot.take(str(tmp_path / "elsewhere"), root=snap)  # a snapshot, not a checkout
    assert (again.hash, again.commit, again.diff_hash) == (untracked.hash, untracked.commit, untracked.diff_hash)
    assert json.loads((snap / MANIFEST).read_text())["commit"] == head(checkout)


def test_resources_code_accepts_snapshot_or_live_only(tmp_path):
    job = str(REPO / "jobs" / "pretrain.yaml")
    assert load_spec(job).resources.code == "snapshot"
    assert load_spec(job, ["resources.code=live"]).resources.code == "live"
    with pytest.raises(SpecError) as e:
        load_spec(job, ["resources.code=frozen"])
    assert "resources.code" in str(e.value) and "frozen" in str(e.value)


def test_the_batch_script_imports_the_runs_snapshot(checkout, tmp_path, monkeypatch):
    from orchestrator.executors.slurm import REPO as LIVE, executor_parameters
    from orchestrator.runs import register_run

    monkeypatch.setenv("ORCH_HOME", str(tmp_path / ".orch"))
    monkeypatch.setattr(code_snapshot, "ROOT", checkout)  # as if orch ran from the scratch checkout
    registry = Registry(tmp_path / ".orch" / "registry.db")
    job = str(REPO / "jobs" / "pretrain.yaml")
    cfg = load_spec(job, [f"runs_dir={tmp_path / 'runs'}", "executor=slurm"], launch=True)
    snapped = register_run(registry, cfg, "slurm")
    snap = code_snapshot.read(snapped.run_dir)
    setup = executor_parameters(snapped, cfg.resources)["setup"]
    assert setup == [f"export PYTHONPATH={snap.path}${{PYTHONPATH:+:$PYTHONPATH}}", "export PYTHONSAFEPATH=1"]
    not_registered = dataclasses.replace(snapped, run_dir=str(tmp_path / "runs" / "dry-run"))  # `--dry-run`'s
    assert executor_parameters(not_registered, cfg.resources)["setup"] == setup
    assert not (tmp_path / "runs" / "dry-run").exists()

    live = register_run(registry, load_spec(job, [f"runs_dir={tmp_path / 'runs'}", "resources.code=live"]), "slurm")
    assert executor_parameters(live, cfg.resources)["setup"] == [
        f"export PYTHONPATH={LIVE}${{PYTHONPATH:+:$PYTHONPATH}}"
    ]

    shutil.rmtree(snap.path)
    with pytest.raises(code_snapshot.CodeSnapshotError, match=snap.path):
        executor_parameters(snapped, cfg.resources)


# ---------------------------------------------------------------- a run, with the checkout broken after submit


@pytest.mark.slow
def test_a_local_run_requeued_and_resumed_runs_the_code_it_was_submitted_with(checkout, tmp_path, tiny_data):
    (checkout / "training" / "note.py").write_text("# uncommitted\n")  # the diff hash records it
    release = tmp_path / "release"
    env = dict(
        env_for(tmp_path),
        # the supervisor waits before its first attempt while the checkout is broken; the trainer stops on a
        # signal at step 4 (requeued by the supervisor) and at step 8 (requeues used up: FAILED, then resumed)
        ORCH_FAULT="supervisor.started:wait,train.after_optimizer_step#4:sigusr2,train.after_optimizer_step#8:sigusr2",
        ORCH_FAULT_RELEASE=str(release),
    )
    submitted = orch_in(
        checkout,
        tmp_path,
        "submit",
        "jobs/pretrain.yaml",
        *tiny_overrides(tiny_data, f"runs_dir={tmp_path / 'runs'}", "executor=local", "train.max_steps=10"),
        "checkpoint.every=0",
        "resources.max_requeues=1",
        "resources.max_retries=0",
        env=env,
    )
    assert submitted.returncode == 0, submitted.stderr
    run_id = submitted.stdout.split()[1]
    for module in ("training/trainer.py", "orchestrator/executors/local_supervisor.py"):
        (checkout / module).write_text((checkout / module).read_text() + BROKEN)
    release.touch()

    registry = Registry(tmp_path / ".orch" / "registry.db")
    followed = orch_in(checkout, tmp_path, "logs", run_id, "--follow")
    run = registry.get(run_id)
    assert run.state == "FAILED" and "max_requeues=1 used up" in run.reason, (run, followed.stdout[-3000:])
    resumed = orch_in(checkout, tmp_path, "resume", run_id, "--follow")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr
    run = registry.get(run_id)
    log = (Path(run.run_dir) / "logs" / "train.log").read_text()
    assert run.state == "COMPLETED", (run, log[-3000:])
    assert "requeued after a stop signal (1 of 1)" in log and log.count("resumed from") == 2, log[-3000:]
    assert "SyntaxError" not in log

    listed = json.loads(orch_in(checkout, tmp_path, "runs", "--json").stdout)[0]["code"]
    assert listed["mode"] == "snapshot" and listed["commit"] == head(checkout) and listed["diff_hash"]
    assert Path(listed["path"]).parent == tmp_path / "runs" / ".code"
    table = orch_in(checkout, tmp_path, "runs").stdout
    assert f"{listed['commit'][:8]}+{listed['diff_hash'][:8]}" in table, table
    status = json.loads(orch_in(checkout, tmp_path, "status", run_id, "--json").stdout)
    assert status["jobs"][0]["code"] == listed


@pytest.mark.slow
@pytest.mark.slurm
def test_a_slurm_job_requeued_runs_the_code_it_was_submitted_with(slurm_cluster, checkout, tmp_path, tiny_data):  # noqa: F811
    from orchestrator.executors import slurm

    (checkout / "training" / "note.py").write_text("# uncommitted\n")
    release = tmp_path / "release"
    # sbatch passes our environment on: the trainer waits at step 6 (after its checkpoint at 5) until requeued
    env = dict(env_for(tmp_path), ORCH_FAULT="train.after_optimizer_step#6:wait", ORCH_FAULT_RELEASE=str(release))
    submitted = orch_in(
        checkout,
        tmp_path,
        "submit",
        "jobs/pretrain.yaml",
        *tiny_overrides(tiny_data, f"runs_dir={tmp_path / 'runs'}", "executor=slurm", "name=snapshot"),
        "train.max_steps=10",
        "checkpoint.every=5",
        env=env,
    )
    assert submitted.returncode == 0, submitted.stderr
    registry = Registry(tmp_path / ".orch" / "registry.db")
    run = next(r for r in registry.list() if r.name == "snapshot")
    # the trainer, the job function submitit unpickles and the requeue hook all fail to import from here now
    for module in ("training/trainer.py", "orchestrator/executors/slurm_job.py"):
        (checkout / module).write_text((checkout / module).read_text() + BROKEN)
    log = Path(run.run_dir) / "slurm" / f"{run.slurm_job_id}_0_log.out"

    def finished():
        slurm.SlurmExecutor(registry).refresh([registry.get(run.id)])
        return registry.get(run.id).finished

    def reached():
        return log.is_file() and "[orch fault]" in log.read_text()

    wait_until(lambda: reached() or finished(), 240, "the trainer to reach step 6", interval=1)
    assert reached(), (registry.get(run.id), log.read_text(errors="replace")[-3000:])
    subprocess.run(["scontrol", "requeue", run.slurm_job_id], check=True, capture_output=True)
    release.touch()
    wait_until(finished, 300, f"Slurm job {run.slurm_job_id} to finish", interval=2)
    done, text = registry.get(run.id), log.read_text(errors="replace")
    assert done.state == "COMPLETED" and done.attempts == 2, (done, text[-3000:])
    assert "resumed from" in text and "SyntaxError" not in text, text[-3000:]
    states = [r["State"].split()[0] for r in slurm.sacct_records([run.slurm_job_id])[run.slurm_job_id]]
    assert states == ["REQUEUED", "COMPLETED"], states

    listed = json.loads(orch_in(checkout, tmp_path, "runs", "--json").stdout)[0]["code"]
    assert listed["commit"] == head(checkout) and listed["diff_hash"] and listed["mode"] == "snapshot"
    assert f"export PYTHONPATH={listed['path']}" in next((Path(run.run_dir) / "slurm").glob("*.sh")).read_text()
