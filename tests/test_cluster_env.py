"""The environment a job carries to the nodes (resources.setup, env, python, container), `orch submit --dry-run`,
and the trainer's exit codes: a check's error is 2 and never retried, anything else is a bug, 1, retried.

The Slurm tests run on the local two-node cluster (slurm/cluster.sh): skipped without it, failed under CI=true.
No container runtime (pyxis/enroot) is installed there, so the container keys are checked in the rendered script
(and by `bash -n`), not run. Synchronisation is by polling the registry, sacct and the files the jobs write.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, env_for, tiny_overrides
from test_slurm_cluster import slurm_cluster, wait_until  # noqa: F401  (the session fixture)

from orchestrator.registry import Registry

JOB = str(REPO / "jobs" / "pretrain.yaml")
VENV = REPO / ".venv"


def orch(tmp: Path, *args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args],
        cwd=tmp,
        env={**env_for(tmp), **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def job_file(tmp: Path, resources: dict, executor: str = "slurm") -> str:
    """A job file of the demo's, with these resources (JSON is YAML: control characters survive as escapes)."""
    path = tmp / "job.yaml"
    path.write_text(json.dumps({"kind": "pretrain", "executor": executor, "resources": resources}))
    return str(path)


def dry_run_script(stdout: str) -> str:
    """The batch script `orch submit --dry-run` printed: from its #! line to the closing marker."""
    body = stdout.split("#!/bin/bash", 1)[1].split("# ---- dry run:", 1)[0]
    assert body.endswith("\n")
    return "#!/bin/bash" + body[:-1]


# ------------------------------------------------------------------ bad input: exit 2 at submit, nothing queued


@pytest.mark.parametrize(
    "resources, key, words",
    [
        ({"setup": ["module load cuda\a"]}, "resources.setup[0]", "control character"),
        ({"setup": ['echo "unfinished']}, "resources.setup[0]", "No closing quotation"),
        ({"setup": ["cat <<EOF"]}, "resources.setup[0]", "here-document"),
        ({"container": {"image": "nvcr.io#nvidia/pytorch\n:24.08"}}, "resources.container.image", "control character"),
        ({"container": {"image": "img", "mounts": ["/a:/b,/c:/d"]}}, "resources.container.mounts[0]", "SRC:DST"),
        ({"env": {"NCCL-DEBUG": "WARN"}}, "resources.env", "'NCCL-DEBUG', which is not a variable name"),
        ({"env": {"PYTHONPATH": "/x"}}, "resources.env", "orch sets itself"),
    ],
)
def test_bad_node_environment_exits_2_at_submit_naming_the_key(tmp_path, resources, key, words):
    result = orch(tmp_path, "submit", job_file(tmp_path, resources), f"runs_dir={tmp_path / 'runs'}")
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"key '{key}'" in result.stderr and words in result.stderr and "job.yaml" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / ".orch").exists()  # nothing registered or queued


@pytest.mark.parametrize("resources", [{"setup": ["module load cuda"]}, {"container": {"image": "img"}}])
def test_the_local_executor_refuses_setup_lines_and_containers(tmp_path, resources):
    result = orch(tmp_path, "submit", job_file(tmp_path, resources, executor="local"), f"runs_dir={tmp_path / 'r'}")
    assert result.returncode == 2 and "the local executor" in result.stderr and "executor=slurm" in result.stderr
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------------------------- the dry run's script


def test_dry_run_renders_the_environment_quoted_and_writes_nothing(tmp_path):
    result = orch(
        tmp_path,
        "submit",
        "--dry-run",
        JOB,
        "executor=slurm",
        f"runs_dir={tmp_path / 'runs'}",
        "resources.code=live",
        "resources.setup=[module load cuda/12.4,source /shared/venv/bin/activate]",
        "resources.env.NCCL_DEBUG=WARN; rm -rf $HOME",
        "resources.python=/shared/venv/bin/python",
        "resources.container.image=nvcr.io#nvidia/pytorch:24.08-py3",
        "resources.container.mounts=[/scratch/me:/scratch/me,/data:/data:ro]",
    )
    assert result.returncode == 0, result.stderr
    script = dry_run_script(result.stdout)
    lines = script.splitlines()
    setup = lines[lines.index("# setup") + 1 :]
    assert setup[:4] == [
        f"export PYTHONPATH={REPO}${{PYTHONPATH:+:$PYTHONPATH}}",
        "module load cuda/12.4",
        "source /shared/venv/bin/activate",
        "export NCCL_DEBUG='WARN; rm -rf $HOME'",  # a value stays a value
    ]
    srun = next(line for line in lines if line.startswith("srun "))
    assert "'--container-image=nvcr.io#nvidia/pytorch:24.08-py3'" in srun  # '#' would start a comment unquoted
    assert "--container-mounts=/scratch/me:/scratch/me,/data:/data:ro" in srun
    assert " /shared/venv/bin/python -u -m submitit.core._submit " in srun
    after = next(line for line in lines if "after-srun" in line)
    assert after.startswith(f"{sys.executable} -m "), "outside the container: the interpreter running orch"
    syntax = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr
    resolved = result.stdout.split("# ---- what the", 1)[0]
    assert "image: nvcr.io#nvidia/pytorch:24.08-py3" in resolved and "NCCL_DEBUG: WARN; rm -rf $HOME" in resolved
    assert not (tmp_path / "runs").exists() and not (tmp_path / ".orch").exists()


def test_dry_run_of_a_local_job_prints_its_command_line(tmp_path):
    result = orch(
        tmp_path, "submit", "--dry-run", JOB, "executor=local", f"runs_dir={tmp_path / 'runs'}", "resources.env.X=a b"
    )
    assert result.returncode == 0, result.stderr
    command = result.stdout.split("would be handed", 1)[1].splitlines()[1]
    assert command.startswith(f"env 'X=a b' {sys.executable} -m training.main "), command
    assert not (tmp_path / "runs").exists() and not (tmp_path / ".orch").exists()


# ------------------------------------------------------------------------ exit codes: a bug is 1 and retried


def trainer(run_dir: Path, data_dir: str, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "training.main", JOB, *tiny_overrides(data_dir, *extra), "--run-dir", str(run_dir)],
        cwd=run_dir.parent,
        env={**env_for(run_dir.parent), **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
@pytest.mark.parametrize("action, error", [("error", "RuntimeError"), ("valueerror", "ValueError")])
def test_an_unexpected_error_exits_1_saying_where_its_traceback_went(tmp_path, tiny_data, action, error):
    fault = {"ORCH_FAULT": f"run_lock.held:{action}"}  # in the trainer, once it holds its run folder
    result = trainer(tmp_path / "run", tiny_data, "train.max_steps=3", env=fault)
    assert result.returncode == 1, result.stderr[-3000:]
    traceback = tmp_path / "run" / "logs" / "traceback.txt"
    last = result.stderr.strip().splitlines()[-1]
    assert f"unexpected {error}" in last and str(traceback) in last and "ORCH_DEBUG=1" in last, last
    assert "Traceback" not in result.stderr and "fault point" in traceback.read_text()
    assert not (tmp_path / "run" / "logs" / "user_error.txt").exists()

    debug = trainer(tmp_path / "run2", tiny_data, "train.max_steps=3", env={**fault, "ORCH_DEBUG": "1"})
    assert debug.returncode == 1 and "Traceback" in debug.stderr and error in debug.stderr


def submit_local(tmp: Path, data_dir: str, *extra: str, env: dict | None = None):
    tmp.mkdir(exist_ok=True)
    result = orch(
        tmp,
        "submit",
        JOB,
        *tiny_overrides(data_dir, f"runs_dir={tmp / 'runs'}", "executor=local", *extra),
        "--follow",
        env=env,
        timeout=600,
    )
    registry = Registry(tmp / ".orch" / "registry.db")
    (run,) = registry.list()
    return result, run


@pytest.mark.slow
def test_a_bug_is_retried_per_max_retries_and_a_user_error_is_not(tmp_path, tiny_data):
    once = tmp_path / "fired"
    fault = {"ORCH_FAULT": "run_lock.held:error", "ORCH_FAULT_ONCE": str(once)}  # the first attempt only
    result, run = submit_local(tmp_path / "bug", tiny_data, "train.max_steps=2", "resources.max_retries=1", env=fault)
    assert run.state == "COMPLETED" and run.attempts == 2, (run, result.stdout[-3000:])
    assert once.exists() and "restarting after exit code 1" in result.stdout

    # a file system without flock: the trainer's own check (LockUnsupported), exit 2, never retried
    user = {"ORCH_FAULT": "run_lock.flock:enolck"}
    result, run = submit_local(tmp_path / "user", tiny_data, "train.max_steps=3", "resources.max_retries=3", env=user)
    assert run.state == "FAILED" and run.attempts == 1 and run.exit_code == 2, (run, result.stdout[-3000:])
    assert "does not support flock" in run.reason


@pytest.mark.slow
def test_the_local_executor_runs_resources_python_with_resources_env(tmp_path, tiny_data):
    seen = tmp_path / "seen.txt"
    wrapper = tmp_path / "python"
    wrapper.write_text(f'#!/bin/sh\necho "$ORCH_TEST_MARK" >> {seen}\nexec {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    extra = ("train.max_steps=2", f"resources.python={wrapper}", "resources.env.ORCH_TEST_MARK=from the job")
    result, run = submit_local(tmp_path, tiny_data, *extra)
    assert run.state == "COMPLETED", result.stdout[-3000:]
    assert seen.read_text() == "from the job\n"


# ---------------------------------------------------------------------------------------- on the local Slurm


@pytest.mark.slurm
@pytest.mark.slow
def test_a_setup_line_activates_the_environment_and_the_dry_run_is_what_sbatch_got(slurm_cluster, tiny_data, tmp_path):  # noqa: F811  (the fixture, imported above)
    """The nodes' `python` is the one a setup line activates, not the submitter's interpreter (the batch script names
    `python`; sbatch passes on the submitter's PATH, which does not hold the virtualenv)."""
    args = [
        JOB,
        *tiny_overrides(tiny_data, "train.max_steps=2"),
        "executor=slurm",
        f"runs_dir={tmp_path / 'runs'}",
        "resources.code=live",
        f"resources.setup=[source {VENV}/bin/activate,echo orch-setup-python=$(command -v python)]",
        "resources.python=python",
        "resources.env.ORCH_TEST_MARK=a b",
    ]
    assert str(VENV) not in env_for(tmp_path)["PATH"]
    dry = orch(tmp_path, "submit", "--dry-run", *args)
    assert dry.returncode == 0, dry.stderr
    submitted = orch(tmp_path, "submit", *args)
    assert submitted.returncode == 0, submitted.stderr
    registry = Registry(tmp_path / ".orch" / "registry.db")
    (run,) = registry.list()
    drawn = dry.stdout.split("(run id ", 1)[1].split(" ", 1)[0]
    script = (Path(run.run_dir) / "slurm" / f"{run.slurm_job_id}_submission.sh").read_text()
    assert dry_run_script(dry.stdout).replace(drawn, run.id) == script

    from orchestrator.executors.slurm import SlurmExecutor, log_file

    def finished():
        SlurmExecutor(registry).refresh([registry.get(run.id)])
        current = registry.get(run.id)
        return current if current.finished else None

    done = wait_until(finished, 300, f"run {run.id} (Slurm job {run.slurm_job_id}) to finish", interval=2)
    log = log_file(done).read_text(errors="replace")
    assert done.state == "COMPLETED", (done, log[-3000:])
    assert f"orch-setup-python={VENV}/bin/python" in log, log[-3000:]
