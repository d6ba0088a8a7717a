"""The Slurm executor: submits a run as one Slurm job through submitit, and reads its state back from sacct.

    SlurmExecutor(registry).submit(run, cfg)   -> Slurm job id (recorded, state PENDING)
    .submit_pipeline(id, runs, cfgs)           -> every stage at once, each held with --dependency=afterok
    .observe(runs) / .refresh(runs)            -> states from ONE `sacct --parsable2` call (refresh records them)
    .cancel(run)                               -> scancel (the trainer checkpoints on the SIGTERM it brings)
    .resume(run)                               -> a new job on the folder, unless a trainer holds its lock or
                                                  Slurm still holds a job of the run (flock may be node-local)

The job runs one srun task per process (resources.nodes x resources.nproc_per_node), each calling the same
entry point as torchrun (see slurm_job.TrainingJob). Slurm sends SIGUSR2 `signal_delay_s` before the time
limit; the trainer saves a checkpoint and exits 3, and the batch script requeues the job (slurm_job.after_srun),
which keeps its id and resumes from that checkpoint. submitit's files (the batch script, our pickled job
function, the logs `<job id>_<task>_log.out`) live in run_dir/slurm/.

The environment on the nodes comes from the job's resources (docs/cluster.md): its `setup` lines run in the batch
script before srun, then its `env` is exported (quoted); each task runs `python` (default: the interpreter running
orch), inside `container.image` when one is set (pyxis/enroot's `srun --container-image`). `batch_script` gives the
script sbatch would receive (`orch submit --dry-run`), written by the same submitit code as a submission.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterable, Optional, Sequence

from omegaconf import OmegaConf

from jobspec.contract import RunFolder, stop_grace_s, user_error
from jobspec.processes import same_process, this_process
from orchestrator import code_snapshot
from orchestrator.dependencies import dependency_reason, parents_first_runs
from orchestrator.executors.base import CANCELLED_BY_USER, Observation, refuse_if_held
from orchestrator.filesystems import check_runs_dir
from orchestrator.registry import TERMINAL, Registry, Run, now

REPO = Path(__file__).resolve().parents[2]

# sacct's states -> the registry's. Anything not listed (TIMEOUT, NODE_FAIL, OUT_OF_MEMORY, PREEMPTED,
# BOOT_FAIL, DEADLINE, FAILED) is FAILED, with Slurm's word for it in the reason.
STATES = {
    "PENDING": "PENDING",
    "REQUEUED": "PENDING",
    "REQUEUE_HOLD": "PENDING",
    "REQUEUE_FED": "PENDING",
    "RESV_DEL_HOLD": "PENDING",
    "RUNNING": "RUNNING",
    "COMPLETING": "RUNNING",
    "CONFIGURING": "RUNNING",
    "SUSPENDED": "RUNNING",
    "RESIZING": "RUNNING",
    "SIGNALING": "RUNNING",
    "STAGE_OUT": "RUNNING",
    "STOPPED": "RUNNING",
    "COMPLETED": "COMPLETED",
    "CANCELLED": "CANCELLED",
}


SACCT_TIMEOUT_S = 15  # a dashboard refresh waits this long at most for a slow slurmctld/slurmdbd
COMPLETING_WAIT_S = 60  # `orch resume` waits this long at most for a job of the run to finish completing


class SlurmError(RuntimeError):
    """sbatch/sacct/scancel failed; the message says which command and why."""


def signal_delay_s(time_min: int, grace_s: int = 0) -> int:
    """Seconds between the SIGUSR2 warning and the time limit: a tenth of the limit, 15 s to 5 min. slurmctld
    checks limits every 30 s, so the warning comes 0-30 s earlier still. A small model saves in a few seconds; a
    run whose trainer has timed its saves (grace_s: jobspec.contract.stop_grace_s) gets that long, up to half
    the limit."""
    return max(15, min(300, time_min * 6), min(grace_s, time_min * 30))


def sbatch_extra_parameters(flags: Iterable[str]) -> dict:
    """resources.sbatch_extra (["--exclusive", "--reservation=r1"]) -> submitit's additional_parameters."""
    params = {}
    for flag in flags:
        if not flag.startswith("--"):
            raise ValueError(
                f"resources.sbatch_extra has the value {flag!r}, but each entry must be one long sbatch "
                "option, --name or --name=value (e.g. \"--exclusive\", \"--reservation=r1\")"
            )
        name, _, value = flag[2:].partition("=")
        params[name] = value if value else True
    return params


def code_setup(run: Run, resources) -> list[str]:
    """The batch script's first lines: every command after them (submitit's, the tasks', after_srun) imports the
    run's code snapshot (orchestrator/code_snapshot.py), or this checkout for resources.code=live. The script is
    the same at each requeue, so a requeued job runs the submitted code too."""
    return code_snapshot.shell_exports(run.run_dir, live_root=REPO, mode=resources.get("code"))


# The environment's keys are read with .get: a run folder's config.yaml written before they existed has none, and
# `orch resume` submits such a run again.


def node_python(resources) -> str:
    """The interpreter the tasks run, quoted for the batch script: resources.python, else the one running orch."""
    return shlex.quote(resources.get("python") or sys.executable)


def setup_lines(resources) -> list[str]:
    """resources.setup verbatim (each checked to be one complete command: jobspec/checks.py), then resources.env,
    each value quoted, so that a variable wins over what a module or an activate script set."""
    exports = [f"export {name}={shlex.quote(str(value))}" for name, value in (resources.get("env") or {}).items()]
    return [*(resources.get("setup") or []), *exports]


def container_image(resources) -> Optional[str]:
    return (resources.get("container") or {}).get("image")


def container_srun_args(resources) -> list[str]:
    """pyxis's srun options (submitit quotes each argument); none without an image."""
    image, mounts = container_image(resources), (resources.get("container") or {}).get("mounts")
    if not image:
        return []
    return [f"--container-image={image}", *([f"--container-mounts={','.join(mounts)}"] if mounts else [])]


def executor_parameters(run: Run, resources, dependency_job_ids: Sequence[str] = ()) -> dict:
    """submitit SlurmExecutor parameters for a run: its resources, its environment, the requeue hook, the
    dependencies."""
    # after_srun runs in the batch script, on the node outside any container: the container's interpreter is not
    # there, the one running orch is (on the shared file system, docs/cluster.md)
    python = shlex.quote(sys.executable) if container_image(resources) else node_python(resources)
    params = dict(
        job_name=run.id,
        nodes=resources.nodes,
        ntasks_per_node=resources.nproc_per_node,
        cpus_per_task=resources.cpus_per_task,
        time=resources.time_min,
        signal_delay_s=signal_delay_s(resources.time_min, stop_grace_s(RunFolder(run.run_dir), untimed=0)),
        stderr_to_stdout=True,  # one log per task: run_dir/slurm/<job id>_<task>_log.out
        # One task dying (SIGKILL, a crash) ends the step at once, instead of the others waiting in a collective.
        srun_args=["--kill-on-bad-exit=1", *container_srun_args(resources)],
        setup=[*code_setup(run, resources), *setup_lines(resources)],
        # Right after srun: "$?" is its exit status; after_srun requeues or ends the job (see slurm_job.py).
        teardown=[
            "ORCH_SRUN_STATUS=$?",
            f"{python} -m orchestrator.executors.slurm_job after-srun \"$ORCH_SRUN_STATUS\" {shlex.quote(run.run_dir)}",
        ],
        additional_parameters={"requeue": True},  # node failures and preemptions put the job back in the queue
    )
    if resources.gpus_per_node:
        params["gpus_per_node"] = resources.gpus_per_node
    if resources.mem_gb:
        params["mem"] = f"{resources.mem_gb}G"
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(resources, key):
            params[key] = getattr(resources, key)
    if dependency_job_ids:
        params["dependency"] = "afterok:" + ":".join(str(j) for j in dependency_job_ids)
        # a parent that failed can never satisfy afterok: Slurm then cancels this job instead of keeping it
        # PENDING forever (whatever the cluster's kill_invalid_depend), so no process of ours must watch
        params["additional_parameters"]["kill-on-invalid-dep"] = "yes"
    params["additional_parameters"].update(sbatch_extra_parameters(resources.sbatch_extra))
    return params


def slurm_executor(run: Run, cfg, dependency_job_ids: Sequence[str] = (), *, script_only: bool = False):
    """The submitit executor that submits this run, its parameters set. script_only: one that writes the batch
    script even where Slurm's commands are missing (`orch submit --dry-run` on a laptop)."""
    import submitit

    cls = _script_writer() if script_only else submitit.SlurmExecutor
    folder, resources = Path(run.run_dir) / "slurm", cfg.resources
    executor = cls(folder=folder, max_num_timeout=resources.max_requeues, python=node_python(resources))
    executor.update_parameters(**executor_parameters(run, cfg.resources, dependency_job_ids))
    return executor


def batch_script(run: Run, cfg, dependency_job_ids: Sequence[str] = ()) -> str:
    """The batch script sbatch receives for this run: submitit's own text, as `submit` has it written."""
    executor = slurm_executor(run, cfg, dependency_job_ids, script_only=True)
    return executor._make_submission_file_text(executor._submitit_command_str, "")


def _script_writer():
    import submitit

    class ScriptWriter(submitit.SlurmExecutor):
        @classmethod
        def affinity(cls) -> int:  # submitit refuses to build an executor where srun is missing
            return 2

    return ScriptWriter


def _timestamp(value: str) -> Optional[float]:
    try:
        return time.mktime(time.strptime(value, "%Y-%m-%dT%H:%M:%S"))
    except ValueError:  # "Unknown", "None" for a job not started or not ended
        return None


def _assigned(nodes: str) -> bool:
    return nodes not in ("", "None assigned")


def _exit_code(value: str) -> Optional[int]:
    """sacct's "code:signal" -> an exit status in the shell's style (128 + signal when killed)."""
    code, _, sig = value.partition(":")
    if not code.isdigit():
        return None
    return 128 + int(sig) if int(code) == 0 and sig.isdigit() and int(sig) else int(code)


def sacct_records(job_ids: Sequence[str]) -> dict[str, list[dict]]:
    """Every record of each job, oldest first: one per start (-D keeps the records of requeued starts). A job
    array's task may be asked for as `<array>_<index>` (a sweep's members: slurm_sweep.py) and is keyed so."""
    fields = ["JobIDRaw", "State", "ExitCode", "Start", "End", "Reason", "NodeList", "JobID"]
    cmd = ["sacct", "--parsable2", "--noheader", "-X", "-D", "-j", ",".join(job_ids), "-o", ",".join(fields)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=SACCT_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SlurmError(f"`{' '.join(cmd)}` failed: {e}") from None
    if proc.returncode != 0:
        raise SlurmError(
            f"`{' '.join(cmd)}` failed (exit {proc.returncode}): {proc.stderr.strip()} "
            "(sacct needs slurmdbd: is accounting configured?)"
        )
    records: dict[str, list[dict]] = {}
    for line in proc.stdout.splitlines():
        values = line.split("|")
        if len(values) == len(fields):
            record = dict(zip(fields, values))
            key = record["JobID"] if record["JobID"] in job_ids else record["JobIDRaw"]
            records.setdefault(key, []).append(record)
    return records


def queued_states(job_ids: Sequence[str]) -> dict[str, str]:
    """squeue's word for each of these jobs that Slurm still holds (PENDING, RUNNING, REQUEUED, ...). A job that
    Slurm requeued after a node failure or a preemption has a terminal last record in sacct (NODE_FAIL, PREEMPTED)
    until it starts again: only squeue says it is coming back. {} if squeue can't be asked."""
    try:
        proc = subprocess.run(["squeue", "-h", "-o", "%i|%T"], capture_output=True, text=True, timeout=SACCT_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    wanted = set(job_ids)
    pairs = (line.split("|", 1) for line in proc.stdout.splitlines() if "|" in line)
    return {job: state for job, state in pairs if job in wanted and STATES.get(state) in ("PENDING", "RUNNING")}


def jobs_named(names: Sequence[str]) -> set[str]:
    """Which of these job names Slurm has seen in the last month (our jobs are named after their run id)."""
    cmd = ["sacct", "--parsable2", "--noheader", "-X", "-S", "now-30days", "--name", ",".join(names), "-o", "JobName"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=SACCT_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SlurmError(f"`{' '.join(cmd)}` failed: {e}") from None
    if proc.returncode != 0:
        raise SlurmError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}): {proc.stderr.strip()}")
    return set(proc.stdout.split())


def jobs_held(names: Sequence[str]) -> dict[str, str]:
    """job id -> state for every job of these names that Slurm still holds (pending, running, suspended...)."""
    cmd = ["squeue", "-h", "--name", ",".join(names), "-o", "%i|%T"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=SACCT_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SlurmError(f"`{' '.join(cmd)}` failed: {e}") from None
    if proc.returncode != 0:
        raise SlurmError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}): {proc.stderr.strip()}")
    return dict(line.split("|", 1) for line in proc.stdout.splitlines() if "|" in line)


def failure_reason(run: Run, slurm_state: str, exit_code: str) -> str:
    from orchestrator.executors.slurm_job import FINAL_REASON

    why = user_error(RunFolder(run.run_dir))
    if why:
        return why
    final = Path(run.run_dir) / "slurm" / FINAL_REASON
    if final.is_file():
        return final.read_text().strip()
    return f"Slurm job {run.slurm_job_id} {slurm_state} (exit {exit_code}); see `orch logs {run.id}`"


def log_file(run: Run) -> Optional[Path]:
    """Rank 0's log (submitit's stdout+stderr of task 0, appended by every start of the job): the current job's,
    else the newest one in run_dir/slurm/."""
    slurm_dir = Path(run.run_dir) / "slurm"
    if run.slurm_job_id and (slurm_dir / f"{run.slurm_job_id}_0_log.out").is_file():
        return slurm_dir / f"{run.slurm_job_id}_0_log.out"
    logs = sorted(slurm_dir.glob("*_0_log.out"), key=lambda p: p.stat().st_mtime)
    return logs[-1] if logs else None


class SlurmExecutor:
    name = "slurm"

    def __init__(self, registry: Registry):
        self.registry = registry

    def check(self, cfg, source: str) -> None:
        # the run may be resumed, requeued or restarted on another node than its last trainer's
        check_runs_dir(cfg.runs_dir, source, across_nodes=True)

    def dry_run(self, run: Run, cfg) -> str:
        if cfg.kind == "data":  # four jobs, two of them arrays over shards planned at submit (slurm_array.py)
            return "# a data job's four batch scripts are made at submit, once its shards are planned\n"
        note = ""
        if OmegaConf.select(cfg, "resources.code") == "snapshot":
            note = (
                "# resources.code=snapshot: a submit puts the code snapshot it takes on PYTHONPATH in place of "
                f"{REPO}\n"
            )
        return note + batch_script(run, cfg) + "\n"

    def submit(self, run: Run, cfg, dependency_job_ids: Sequence[str] = ()) -> str:
        """Submit a registered run as a Slurm job; records its job id, state PENDING, executor "slurm"."""
        if cfg.kind == "data":  # the curation stage: job arrays over its shards (slurm_array.py)
            from orchestrator.executors import slurm_array

            ids = slurm_array.submit(run, self.registry, cfg, executor_parameters, dependency_job_ids)
            return f"slurm array jobs {ids['analyze']} and {ids['write']}, report job {ids['report']}"
        from orchestrator.executors import slurm_sweep

        if slurm_sweep.folder_of(run) is not None:  # a sweep's member: a task of a sweep array (slurm_sweep.py)
            return slurm_sweep.submit_runs(self.registry, [run], executor_parameters)
        from orchestrator.executors.slurm_job import TrainingJob

        run_dir = Path(run.run_dir)
        slurm_dir = run_dir / "slurm"
        slurm_dir.mkdir(parents=True, exist_ok=True)
        RunFolder(run_dir).logs.mkdir(exist_ok=True)
        try:
            job = slurm_executor(run, cfg, dependency_job_ids).submit(TrainingJob(str(run_dir)))
        except (subprocess.CalledProcessError, RuntimeError) as e:  # submitit's FailedJobError carries sbatch's stderr
            detail = getattr(e, "stderr", None) or str(e)
            detail = detail.decode(errors="replace") if isinstance(detail, bytes) else str(detail)
            detail = "; ".join(line.strip() for line in detail.splitlines() if line.strip()) or repr(e)
            error = SlurmError(f"sbatch refused run {run.id} ({run_dir}/config.yaml): {detail}")
            self.registry.update(run.id, state="FAILED", reason=str(error), ended_at=now())
            raise error from None
        except ValueError as e:  # a bad resources.sbatch_extra entry
            self.registry.update(run.id, state="FAILED", reason=str(e), ended_at=now())
            raise ValueError(f"{run_dir}/config.yaml: {e}") from None
        if not self.registry.transition(run.id, ("PENDING",), executor="slurm", slurm_job_id=str(job.job_id)):
            # cancelled while sbatch ran (a pipeline being cancelled): the job must not run either
            self.registry.update(run.id, slurm_job_id=str(job.job_id))
            self._scancel(str(job.job_id))
        return f"slurm job {job.job_id}"

    def submit_pipeline(self, pipeline_id: str, runs: Sequence[Run], cfgs: dict) -> None:
        """Submit the stages, parents first, each depending on its parent's job. If one submission fails, the
        ones already submitted are cancelled and every stage is marked so, then the error is raised."""
        job_ids: dict[str, str] = {}
        try:
            for run in runs:
                deps = (job_ids[run.depends_on],) if run.depends_on else ()
                self.submit(run, cfgs[run.stage], dependency_job_ids=deps)
                job_ids[run.id] = self.registry.get(run.id).slurm_job_id
        except BaseException as e:
            why = f"the pipeline could not be submitted: {str(e).splitlines()[0] if str(e) else repr(e)}"
            for run in runs:
                if run.id in job_ids:
                    self._scancel(job_ids[run.id])
                self.registry.update(run.id, state="CANCELLED", ended_at=now(), reason=why)
            raise

    def resume(self, run: Run) -> str:
        """Submit a finished run again on the same folder: a new job that resumes from the newest checkpoint,
        with fresh requeue and retry allowances."""
        from orchestrator.executors.slurm_array import STEPS
        from orchestrator.executors.slurm_job import FINAL_REASON, RESTARTS

        run_dir = Path(run.run_dir)
        refuse_if_held(run)
        # flock() may hold on one node only (docs/slurm.md): Slurm's own word that no job of this run is left
        names = [run.id, *(f"{run.id}-{step}" for step in STEPS)]  # a data run's jobs are named by step
        deadline = time.monotonic() + COMPLETING_WAIT_S
        while (held := jobs_held(names)) and set(held.values()) == {"COMPLETING"} and time.monotonic() < deadline:
            time.sleep(1)  # a job just cancelled: Slurm is ending its processes; its state says when they are gone
        if held:
            jobs = ", ".join(f"{job} {state}" for job, state in sorted(held.items()))
            raise RuntimeError(
                f"{run.id} can't be resumed: Slurm still holds a job of it ({jobs}), whose trainer "
                f"would share {run_dir}; `scancel` it, or wait until it has ended"
            )
        if not self.registry.transition(
            run.id,
            TERMINAL,
            state="PENDING",
            ended_at=None,
            exit_code=None,
            reason=None,
            attempts=0,
            slurm_job_id=None,
            **this_process(),
        ):  # ours until sbatch has taken it
            raise RuntimeError(f"{run.id} was resumed by someone else meanwhile ({self.registry.get(run.id).state})")
        for name in (RESTARTS, FINAL_REASON):
            (run_dir / "slurm" / name).unlink(missing_ok=True)
        cfg = OmegaConf.load(RunFolder(run_dir).config)
        return self.submit(self.registry.get(run.id), cfg)

    def cancel(self, run: Run, reason: str = CANCELLED_BY_USER) -> None:
        """scancel the run's job (the trainer checkpoints on the SIGTERM it brings): CANCELLING until sacct
        says the job has ended."""
        if not run.slurm_job_id and same_process(run.pid, run.pid_start, run.host) is False:  # never reached sbatch
            self.registry.transition(run.id, ("PENDING",), state="CANCELLED", reason=reason, ended_at=now())
            return
        self.registry.transition(run.id, ("PENDING", "RUNNING"), state="CANCELLING", reason=reason)
        if run.slurm_job_id:
            from orchestrator.executors.slurm_array import cancel_ids, job_ids

            cancel_ids(job_ids(run))  # a data run's array and dedup jobs, before its report job
            self._scancel(run.slurm_job_id)

    def _scancel(self, job_id: str) -> None:
        proc = subprocess.run(["scancel", str(job_id)], capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            raise SlurmError(f"scancel {job_id} failed: {proc.stderr.strip()}")

    def _read(self, runs: Sequence[Run]) -> dict[str, tuple[Observation, list[dict]]]:
        """(observation, sacct records oldest first) per unfinished Slurm run, from one sacct call."""
        runs = [r for r in runs if r.executor == self.name and r.slurm_job_id and not r.finished]
        if not runs:
            return {}
        try:
            records = sacct_records([r.slurm_job_id for r in runs])
        except SlurmError as e:
            print(f"warning: Slurm states not read: {e}", file=sys.stderr)
            return {}
        queued = queued_states([r.slurm_job_id for r in runs])
        seen = {}
        for run in runs:
            history = records.get(run.slurm_job_id)
            if not history:  # submitted moments ago: slurmdbd has not heard of it yet
                continue
            last = history[-1]
            slurm_state = last["State"].split()[0]  # "CANCELLED by 0" -> "CANCELLED"
            reason = None
            if run.slurm_job_id in queued and STATES.get(slurm_state) not in ("PENDING", "RUNNING"):
                reason = f"Slurm requeued it after {slurm_state}"  # a node failure, a preemption: not the end
                slurm_state = queued[run.slurm_job_id]
            state = STATES.get(slurm_state, "FAILED")
            if state == "FAILED":
                reason = failure_reason(run, slurm_state, last["ExitCode"])
            elif state == "CANCELLED":
                reason = (
                    run.reason if run.state in ("CANCELLING", "CANCELLED") and run.reason else "cancelled (scancel)"
                )
            elif run.state == "CANCELLING":
                state, reason = "CANCELLING", run.reason  # scancel sent; the job is still saving
            elif state == "PENDING" and last["Reason"] not in ("", "None"):
                reason = f"Slurm: {last['Reason']}"  # e.g. Resources, Dependency, BeginTime
            # a start had nodes: sacct gives a job scancelled while pending its cancel time as Start too
            attempts = sum(1 for r in history if _timestamp(r["Start"]) and _assigned(r["NodeList"]))
            where = last["NodeList"] if _assigned(last["NodeList"]) else None
            seen[run.id] = (Observation(state, reason, attempts, word=slurm_state, where=where), history)
        return seen

    def _never_submitted(self, runs: Sequence[Run]) -> dict[str, Observation]:
        """Runs the `orch` command starting them died with before sbatch took them (no job id, their owner
        gone, no job of their name): LOST, never PENDING forever."""
        runs = [
            r
            for r in runs
            if r.executor == self.name
            and r.state == "PENDING"
            and not r.slurm_job_id
            and r.pid
            and same_process(r.pid, r.pid_start, r.host) is False
        ]
        if not runs:
            return {}
        try:
            named = jobs_named([r.id for r in runs])
        except SlurmError as e:
            print(f"warning: Slurm states not read: {e}", file=sys.stderr)
            return {}
        return {
            r.id: Observation(
                "LOST",
                f"the orch command submitting it (pid {r.pid}) died before sbatch; `orch resume {r.id}` submits it",
            )
            for r in runs
            if r.id not in named
        }

    def observe(self, runs: Sequence[Run]) -> dict[str, Observation]:
        return {**{run_id: o for run_id, (o, _) in self._read(runs).items()}, **self._never_submitted(runs)}

    def refresh(self, runs: Sequence[Run]) -> None:
        """Record what sacct says. A pipeline stage that Slurm cancelled before it ever started (its parent
        failed: --kill-on-invalid-dep) is recorded with the reason "dependency <stage> failed"."""
        for run_id, o in self._never_submitted(runs).items():
            self.registry.transition(run_id, ("PENDING",), state="FAILED", reason=o.reason, ended_at=now())
        seen = self._read(runs)
        for run in parents_first_runs(runs):
            if run.id not in seen:
                continue
            o, history = seen[run.id]
            values = dict(
                state=o.state,
                attempts=o.attempts,
                reason=o.reason,
                started_at=o.attempts and _timestamp(history[0]["Start"]) or run.started_at,
            )
            if o.state in TERMINAL:
                values.update(
                    ended_at=_timestamp(history[-1]["End"]) or now(), exit_code=_exit_code(history[-1]["ExitCode"])
                )
            parent = self.registry.get(run.depends_on) if run.depends_on else None
            if (
                o.state == "CANCELLED"
                and not o.attempts
                and run.state not in ("CANCELLING", "CANCELLED")
                and parent is not None
                and parent.state in ("FAILED", "CANCELLED")
            ):
                values["reason"] = dependency_reason(parent)
            # only if nobody moved the run meanwhile (`orch cancel` between our read and this write)
            self.registry.transition(run.id, (run.state,), **values)

    def log_path(self, run: Run) -> Path:
        return log_file(run) or Path(run.run_dir) / "slurm" / f"{run.slurm_job_id}_0_log.out"
