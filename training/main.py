"""The one entry point that runs on the nodes, however it was launched:

    python -m training.main jobs/pretrain.yaml train.max_steps=50            # one process
    torchrun --nproc_per_node 4 -m training.main jobs/pretrain.yaml parallel.tp=2
    srun python -m training.main ...                                          # Slurm tasks

Without --run-dir the run folder is `<runs_dir>/<name>`: running the same command again
resumes from its newest checkpoint. Exit codes are jobspec/contract.py's: 0 done, 1 an unexpected
exception (a bug: its traceback goes to logs/traceback.txt, and the executors retry it per
resources.max_retries; ORCH_DEBUG=1 raises it instead), 2 a user error (one of USER_ERRORS;
logs/user_error.txt says which; retrying won't help), 3 stopped by a signal after saving.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys
from pathlib import Path

from jobspec import SpecError, load_spec
from jobspec.contract import EXIT_BUG, EXIT_USER_ERROR, RunFolder, UserError
from jobspec.faults import fault
from jobspec.loading import save_config


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m training.main", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("config", help="job YAML file")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=50")
    p.add_argument("--run-dir", help="run folder (default: <runs_dir>/<name>)")
    return p.parse_args(argv)


# Each job kind's task: how it builds batches, its loss and its evaluation (training/tasks/, the Task protocol).
TASKS = {
    "pretrain": "training.tasks.pretrain:PretrainTask",
    "sft": "training.tasks.sft:SFTTask",
    "rm": "training.tasks.rm:RewardModelTask",
    "dpo": "training.tasks.dpo:DPOTask",
    "grpo": "training.tasks.grpo:GRPOTask",
    "classify": "training.tasks.classify:ClassifyTask",
}

# Kinds that don't train: a function run(cfg, dist_info, run_dir) -> exit code instead of a task.
RUNNERS = {
    "eval": "training.evaluate.job:run_eval",
    "data": "training.data.curate.job:run_curate",
}


# The checks' own errors: each carries a sentence naming what to fix, and retrying can't help (exit 2). Any other
# exception is a bug, or a node's hiccup: exit 1, retried.
USER_ERRORS = (
    "training.data:DataError",  # a UserError; listed for the reader
    "training.checkpoint:CheckpointError",
    "training.run_folder:SourceError",
    "training.trainer:NonFiniteError",
    "training.evaluate.tasks:EvalError",
    "training.posttrain.collapse:CollapseError",
    "model.hf_families:HFError",
    "jobspec.run_lock:RunFolderBusy",
    "jobspec.run_lock:LockUnsupported",
)


def user_errors() -> tuple[type[BaseException], ...]:
    return (UserError, *(_load(path) for path in USER_ERRORS))


def report_bug(error: BaseException, folder: RunFolder) -> int:
    """An unexpected exception: its traceback to logs/traceback.txt (rank 0; other ranks' to traceback_rankN.txt),
    one paragraph on stderr saying where it went; EXIT_BUG, which the executors retry."""
    import traceback

    rank = int(os.environ.get("RANK", "0"))
    path = folder.logs / ("traceback.txt" if rank == 0 else f"traceback_rank{rank}.txt")
    text = "".join(traceback.format_exception(error))
    try:
        folder.logs.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        where = f"its traceback is in {path}"
    except OSError:
        print(text, file=sys.stderr)
        where = "its traceback is above"
    frame = traceback.extract_tb(error.__traceback__)[-1] if error.__traceback__ else None
    at = f" at {frame.filename}:{frame.lineno}" if frame else ""
    print(
        f"error: unexpected {type(error).__name__}{at}: {error} -- a bug or a fault of this machine, not the job's "
        f"input: exit {EXIT_BUG}, which orch retries per resources.max_retries; {where} "
        "(ORCH_DEBUG=1 raises it here instead)",
        file=sys.stderr,
    )
    return EXIT_BUG


def _load(path: str):
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def record_config(cfg, config_arg: str, folder: RunFolder, is_main: bool) -> None:
    """A run started straight from a job file records its resolved config in its folder (atomically); one
    started by orch already has it, written before launch, and it is the file we were given: left alone."""
    if is_main and Path(config_arg).resolve() != folder.config.resolve():
        folder.path.mkdir(parents=True, exist_ok=True)
        save_config(cfg, folder.config)


def record_exit(code: int, folder: RunFolder, is_main: bool) -> None:
    """Rank 0's exit code in logs/trainer_exit.txt: torchrun turns every rank's non-zero exit into 1, and the
    local executor must still tell a requeue (3, after a stop signal and a checkpoint) from a crash."""
    if is_main:
        try:
            folder.logs.mkdir(parents=True, exist_ok=True)
            folder.trainer_exit.write_text(f"{code}\n")
        except OSError:  # a full disk: the executors then find it themselves
            pass


def report_user_error(message: str, folder: RunFolder, note: bool) -> None:
    """A user error (retrying won't help): on stderr, and, from rank 0, in logs/user_error.txt, where the executors
    learn it (torchrun turns every failure into exit code 1). On a full disk either may fail: the executors then
    find the full disk themselves (jobspec.contract.user_error)."""
    try:
        print(f"error: {message}", file=sys.stderr)
    except OSError:
        pass
    if note:
        try:
            folder.logs.mkdir(parents=True, exist_ok=True)
            folder.user_error.write_text(message + "\n")
        except OSError:
            pass


def run(argv=None) -> int:
    from training.cpu_setup import set_openmp_wait_policy

    set_openmp_wait_policy()  # before torch loads: libgomp reads it then
    args = parse_args(argv)
    try:
        cfg = load_spec(args.config, args.overrides)
    except SpecError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    # Imported after the spec check so a typo fails fast, before torch loads.
    from jobspec.run_lock import RunFolderBusy, RunLock
    from training import checkpoint as ckpt
    from training.distributed import init_distributed, shutdown
    from training.signals import install_stop_handlers
    from training.trainer import Trainer

    folder = RunFolder(args.run_dir or os.path.join(cfg.runs_dir, cfg.name))
    stop = install_stop_handlers()
    lock = RunLock(folder.path)
    try:
        dist_info = init_distributed(cfg.parallel, cfg.train.device)
        ckpt.seed_globals(cfg.seed, dist_info.rank)  # a checkpoint, if any, restores them later
        if dist_info.is_main:
            lock.acquire()  # one trainer per run folder; the lock dies with this process
        dist_info.barrier()
        if dist_info.local_rank == 0 and not dist_info.is_main:
            lock.join()  # each node holds the folder until its own processes are gone
        fault("run_lock.held")
        record_config(cfg, args.config, folder, dist_info.is_main)
        if cfg.kind in RUNNERS:
            code = _load(RUNNERS[cfg.kind])(cfg, dist_info, folder.path)
        else:
            task = _load(TASKS[cfg.kind])(cfg, dist_info, folder.path)
            code = Trainer(cfg, dist_info, folder.path, task, stop=stop).fit()
        record_exit(code, folder, dist_info.is_main)
        return code
    except Exception as e:
        rank0 = int(os.environ.get("RANK", "0")) == 0
        full = isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)
        if not full and not isinstance(e, user_errors()):
            if os.environ.get("ORCH_DEBUG"):
                raise
            record_exit(report_bug(e, folder), folder, rank0)
            return EXIT_BUG
        message = (
            str(e)
            if not isinstance(e, OSError)
            else (
                f"the disk holding {folder.path} is full ({e.strerror}: {e.filename}): free space, then resume; "
                "its checkpoints are untouched"
            )
        )
        # A refused trainer writes no sentence into the busy folder; its exit code still tells a launcher (torchrun
        # reports any failure as 1) not to retry.
        report_user_error(message, folder, rank0 and not isinstance(e, RunFolderBusy))
        record_exit(EXIT_USER_ERROR, folder, rank0)
        return EXIT_USER_ERROR
    finally:
        shutdown()
        lock.release()


def main() -> None:
    sys.exit(run())


if __name__ == "__main__":
    main()
