"""A sweep on Slurm: ONE job array whose task i trains member i of sweep.json, then one job that fits.

    array   --array=<member indices>%P --requeue    task SLURM_ARRAY_TASK_ID trains that member (sweep.json's order)
    fit     --dependency=afterany:<array>           fit.json and report.md once every task has ended

Each task runs as a training job does (slurm_job.py): one srun task per process calling `TrainingJob`, then
`after_srun`, which requeues that task alone (`scontrol requeue` on its own job id) after a checkpointed stop
(resources.max_requeues) or a failure (resources.max_retries, which the sweep's max_retries_per_member sets). A
task whose member has its summary.json (it completed) exits 0 at once, so a task Slurm requeues or a sweep
resumed never trains a finished member again. `orch resume SWEEP` submits a new array of the unfinished members'
indices alone (`--array=1,4%P`) and a new fit job after it.

Each member's registry row records its task as `<array id>_<index>` (sacct and scancel take that form); its log
is run_dir/slurm/<array id>_<index>_0_log.out, where `orch logs` looks. The sweep folder's slurm/ holds the batch
scripts, Slurm's own output of each task before it has found its member, the fit job's log, and jobs.json: one
{"array": id, "fit": id, "members": [indices]} per submission, for `orch cancel SWEEP`.

This file never imports slurm.py (slurm.py hands a sweep member here): the caller passes the run's Slurm
parameters function (slurm.executor_parameters).
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

from jobspec.contract import SUMMARY, RunFolder
from jobspec.loading import SpecError
from orchestrator.registry import Registry, Run, now
from orchestrator.sweeps import SWEEP_PLAN

REPO = Path(__file__).resolve().parents[2]
JOBS = "jobs.json"  # in <sweep folder>/slurm/: a list, one entry per submission

# submitit's parameter names (slurm.executor_parameters) -> sbatch's options
OPTIONS = {
    "nodes": "nodes",
    "ntasks_per_node": "ntasks-per-node",
    "cpus_per_task": "cpus-per-task",
    "time": "time",
    "gpus_per_node": "gpus-per-node",
    "mem": "mem",
    "partition": "partition",
    "account": "account",
    "qos": "qos",
    "constraint": "constraint",
}


def folder_of(run: Run) -> Optional[Path]:
    """The sweep folder of a sweep's member (its sweep.json beside the member's folder), else None."""
    if not run.pipeline_id:
        return None
    folder = Path(run.run_dir).parent / run.pipeline_id
    return folder if (folder / SWEEP_PLAN).is_file() else None


def max_array_size() -> Optional[int]:
    """The cluster's MaxArraySize (`scontrol show config`): array indices run from 0 to this minus 1."""
    try:
        out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    found = re.search(r"^MaxArraySize\s*=\s*(\d+)", out, re.MULTILINE)
    return int(found.group(1)) if found else None


def check_size(path: str, plan_key: str, members: int, limit: Optional[int]) -> None:
    """SpecError (exit 2) when the sweep's members do not fit in one array of this cluster."""
    if limit is not None and members > limit:
        raise SpecError(
            f"{path}: key '{plan_key}' makes {members:,} members, but on Slurm a sweep is one job array and "
            f"this cluster's MaxArraySize is {limit:,} (`scontrol show config`): indices 0 to {limit - 1:,}. "
            f"Give '{plan_key}' fewer values, or split the sweep into files of at most {limit:,} members."
        )


def sbatch_lines(params: dict) -> list[str]:
    """#SBATCH lines for submitit-style parameters (slurm.executor_parameters' keys that a batch script takes)."""
    lines = [f"#SBATCH --{flag}={params[key]}" for key, flag in OPTIONS.items() if params.get(key)]
    if params.get("signal_delay_s"):
        lines.append(f"#SBATCH --signal=USR2@{params['signal_delay_s']}")
    for name, value in params.get("additional_parameters", {}).items():
        lines.append(f"#SBATCH --{name}" if value is True else f"#SBATCH --{name}={value}")
    return lines


def setup(params: dict) -> list[str]:
    """The run's setup lines (the code it runs on PYTHONPATH, resources.setup and env: slurm.executor_parameters),
    else this checkout on PYTHONPATH."""
    return list(params.get("setup") or [f"export PYTHONPATH={shlex.quote(str(REPO))}${{PYTHONPATH:+:$PYTHONPATH}}"])


def index_ranges(indices: Sequence[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> "0-2,5,7-8": sbatch's --array list."""
    parts: list[list[int]] = []
    for i in sorted(indices):
        if parts and i == parts[-1][1] + 1:
            parts[-1][1] = i
        else:
            parts.append([i, i])
    return ",".join(f"{a}-{b}" if b > a else f"{a}" for a, b in parts)


def array_script(folder: Path, plan: dict, indices: Sequence[int], params: dict) -> str:
    """The array's batch script: task i finds member i's folder, skips it if it completed, else trains it."""
    python = shlex.quote(sys.executable)
    spec = index_ranges(indices)
    run_dirs = " ".join(shlex.quote(m["run_dir"]) for m in plan["members"])
    params = dict(params, additional_parameters=dict(params.get("additional_parameters", {}), requeue=True))
    params["additional_parameters"].pop("kill-on-invalid-dep", None)
    return "\n".join(
        [
            "#!/bin/bash",
            f"#SBATCH --job-name={plan['sweep']}",
            f"#SBATCH --array={spec}%{plan['parallel']}",
            f"#SBATCH --output={folder / 'slurm' / '%A_%a.out'}",
            "#SBATCH --open-mode=append",
            *sbatch_lines(params),
            *setup(params),
            "export SUBMITIT_EXECUTOR=slurm  # TrainingJob reads Slurm's variables through submitit.JobEnvironment",
            f"RUN_DIRS=({run_dirs})  # sweep.json's members, in its order",
            'RUN_DIR="${RUN_DIRS[$SLURM_ARRAY_TASK_ID]}"',
            'mkdir -p "$RUN_DIR/slurm"',
            'exec >>"$RUN_DIR/slurm/${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}_0_log.out" 2>&1',
            'echo "[orch] sweep task $SLURM_ARRAY_TASK_ID (job $SLURM_JOB_ID): $RUN_DIR"',
            f'if [ -f "$RUN_DIR/{SUMMARY}" ]; then',
            '  echo "[orch] this member has completed: nothing to do"',
            "  exit 0",
            "fi",
            f'srun --kill-on-bad-exit=1 --unbuffered {python} -m orchestrator.executors.slurm_sweep train "$RUN_DIR"',
            "ORCH_SRUN_STATUS=$?",
            # after_srun requeues $SLURM_JOB_ID: the task's own id, never the array's (one task's SLURM_JOB_ID is
            # the array's id, and `scontrol requeue <array id>` would requeue every task)
            'SLURM_JOB_ID="${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}" \\',
            f'  {python} -m orchestrator.executors.slurm_job after-srun "$ORCH_SRUN_STATUS" "$RUN_DIR"',
            "",
        ]
    )


def fit_script(folder: Path, plan: dict, array_id: str, params: dict) -> str:
    """The fit job: after every task of the array has ended, however it ended (afterany)."""
    python = shlex.quote(sys.executable)
    keep = {k: params[k] for k in ("time", "partition", "account", "qos", "constraint") if params.get(k)}
    return "\n".join(
        [
            "#!/bin/bash",
            f"#SBATCH --job-name={plan['sweep']}-fit",
            f"#SBATCH --dependency=afterany:{array_id}",
            f"#SBATCH --output={folder / 'slurm' / '%j_fit.out'}",
            "#SBATCH --nodes=1",
            "#SBATCH --ntasks=1",
            *sbatch_lines(keep),
            *setup(params),
            f"{python} -m orchestrator.executors.slurm_sweep fit {shlex.quote(str(folder))}",
            "",
        ]
    )


def sbatch(script: Path) -> str:
    proc = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise RuntimeError(f"sbatch {script} failed (exit {proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout.strip().split(";")[0]


def submissions(folder: Path) -> list[dict]:
    path = folder / "slurm" / JOBS
    return json.loads(path.read_text()) if path.is_file() else []


def submit_runs(registry: Registry, runs: Sequence[Run], parameters: Callable[..., dict]) -> str:
    """Submit these registered PENDING members of one sweep as one array (their indices in sweep.json) and a fit
    job after it; each member records its task `<array>_<index>`. `parameters(run, resources)` gives a run's
    Slurm parameters (slurm.executor_parameters). Returns how to refer to them in messages."""
    from omegaconf import OmegaConf

    folder = folder_of(runs[0])
    plan = json.loads((folder / SWEEP_PLAN).read_text())
    index = {m["id"]: i for i, m in enumerate(plan["members"])}
    indices = sorted(index[r.id] for r in runs)
    cfg = OmegaConf.load(RunFolder(runs[0].run_dir).config)  # the members differ only in shape and steps
    params = parameters(runs[0], cfg.resources)
    slurm_dir = folder / "slurm"
    slurm_dir.mkdir(exist_ok=True)
    for run in runs:
        RunFolder(run.run_dir).logs.mkdir(parents=True, exist_ok=True)
    n = len(submissions(folder))
    script = slurm_dir / f"array-{n}.sh"
    script.write_text(array_script(folder, plan, indices, params))
    try:
        array_id = sbatch(script)
    except (OSError, subprocess.TimeoutExpired, RuntimeError) as e:
        for run in runs:
            registry.update(run.id, state="FAILED", reason=f"the sweep's array was not submitted: {e}", ended_at=now())
        raise RuntimeError(f"sweep {plan['sweep']}: {e}") from None
    fit = slurm_dir / f"fit-{n}.sh"
    fit.write_text(fit_script(folder, plan, array_id, params))
    try:
        fit_id = sbatch(fit)
    except (OSError, subprocess.TimeoutExpired, RuntimeError) as e:  # the members run; `orch sweep fit` by hand
        print(f"warning: the sweep's fit job was not submitted ({e}); run `orch sweep fit {folder}`", file=sys.stderr)
        fit_id = None
    (slurm_dir / JOBS).write_text(
        json.dumps([*submissions(folder), {"array": array_id, "fit": fit_id, "members": indices}]) + "\n"
    )
    for run in runs:
        task = f"{array_id}_{index[run.id]}"
        if not registry.transition(run.id, ("PENDING",), executor="slurm", slurm_job_id=task):
            # cancelled while sbatch ran: its task must not run either
            registry.update(run.id, slurm_job_id=task)
            subprocess.run(["scancel", task], capture_output=True, timeout=60)
    return f"slurm array {array_id} ({len(indices)} tasks, {plan['parallel']} at a time), fit job {fit_id}"


def held_tasks(job_ids: Sequence[str]) -> set[str]:
    """The tasks (`<array>_<index>`) and jobs of these arrays that Slurm holds as their own records: started or
    requeued ones. Tasks still pending inside the array's record (`123_[4-7%2]`) are not listed."""
    arrays = sorted({j.split("_")[0] for j in job_ids if j})
    if not arrays:
        return set()
    proc = subprocess.run(
        ["squeue", "-h", "-j", ",".join(arrays), "-o", "%i"], capture_output=True, text=True, timeout=60
    )
    return {line.strip() for line in proc.stdout.splitlines() if "[" not in line}


def train(run_dir: str) -> int:
    """One srun task of a member: the same job function a training job's srun task runs."""
    from orchestrator.executors.slurm_job import TrainingJob

    return TrainingJob(run_dir)()


def fit(folder: str) -> int:
    """The fit job: the members that have a final loss; too few is said, not an error of the job."""
    from orchestrator.sweeps.fit import run as fit_folder  # numpy and scipy: only here

    try:
        fit_path, report, missing = fit_folder(folder)
    except (ValueError, ArithmeticError, OSError) as e:
        print(f"[sweep] no fit: {e} (`orch sweep fit {folder}` once more members have ended)", flush=True)
        return 0
    extra = f" ({len(missing)} member(s) without a loss: {', '.join(missing)})" if missing else ""
    print(f"[sweep] fit: {fit_path}, report: {report}{extra}", flush=True)
    return 0


if __name__ == "__main__":
    # python -m orchestrator.executors.slurm_sweep train RUN_DIR | fit SWEEP_FOLDER   (from the batch scripts)
    if len(sys.argv) != 3 or sys.argv[1] not in ("train", "fit"):
        sys.exit("usage: python -m orchestrator.executors.slurm_sweep train RUN_DIR | fit SWEEP_FOLDER")
    sys.exit((train if sys.argv[1] == "train" else fit)(sys.argv[2]))
