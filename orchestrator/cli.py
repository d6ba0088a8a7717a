"""`orch`: the command line. Each subcommand is a small function; argparse wires them.

Commands that only look (runs, logs, status, pipeline status) read the registry and ask the executors what
they observe; they never change a run. Commands that act (submit, cancel, resume, reconcile, pipeline
wait|cancel|reconcile) own what they touch. The data plane's own commands (generate, chat, serve, export, data
prepare) come from training/tools, imported only when orch builds its parser.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import sys
import time

from omegaconf import OmegaConf

from jobspec import SpecError, load_spec
from jobspec.faults import fault
from jobspec.pipeline_file import is_pipeline_file, load_pipeline
from jobspec.sweep_file import is_sweep_file
from orchestrator import code_snapshot, executors, pipelines, run_names
from orchestrator.registry import Registry
from orchestrator.runs import register_run
from orchestrator.sweeps import command as sweeps


def _fail(msg: str, code: int = 2) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return code


def _print_json(value) -> None:
    print(json.dumps(value, indent=1))


def _no_job_file(command: str) -> int:
    # argparse would say "required: config, overrides", as if overrides were required too
    return _fail(f"which job? `orch {command} JOB.yaml [key=value ...]`, e.g. `orch {command} jobs/pretrain.yaml`")


def cmd_config(args) -> int:
    if not args.config:
        return _no_job_file("config")
    if is_sweep_file(args.config):  # kind: sweep -> the members as planned, then one member's job
        return sweeps.show(args.config, args.overrides)
    if is_pipeline_file(args.config):  # each stage's resolved config (init_from is filled in at submit time)
        pipeline = load_pipeline(args.config, args.overrides, find_run=run_names.finder())
        if args.json:
            _print_json({s.name: OmegaConf.to_container(s.cfg, resolve=True) for s in pipeline.stages})
            return 0
        kinds = {s.name: s.cfg.kind for s in pipeline.stages}
        for stage in pipeline.stages:
            takes = (
                "data.sources = its corpus"
                if kinds.get(stage.after) == "data"
                else "checkpoint.init_from = its run folder"
            )
            after = f" (after {stage.after}: {takes})" if stage.after else ""
            print(f"# ---- stage {stage.name}: {stage.job}{after}")
            print(OmegaConf.to_yaml(stage.cfg), end="")
        return 0
    cfg = load_spec(args.config, args.overrides, launch=True, find_run=run_names.finder())
    if args.json:
        _print_json(OmegaConf.to_container(cfg, resolve=True))
        return 0
    print(OmegaConf.to_yaml(cfg), end="")
    return 0


def cmd_submit(args) -> int:
    if not args.config:
        return _no_job_file("submit")
    if args.dry_run and (is_sweep_file(args.config) or is_pipeline_file(args.config)):
        return _fail(f"--dry-run shows one job; `orch config {args.config}` prints its jobs' resolved configs")
    if is_sweep_file(args.config):  # kind: sweep -> its members, `parallel` at a time, then the fit
        return sweeps.submit(args.config, args.overrides)
    if is_pipeline_file(args.config):  # kind: pipeline -> a chain of stages
        return submit_pipeline(args.config, args.overrides, follow=args.follow)
    cfg = load_spec(args.config, args.overrides, launch=True, find_run=run_names.finder())
    registry = None if args.dry_run else Registry()  # a dry run leaves ORCH_HOME as it is
    name = executors.resolve(cfg.executor)
    if cfg.executor == "auto":  # say which: the same file trains here on a laptop and on Slurm on a login node
        why = "a Slurm cluster answers" if name == "slurm" else "no Slurm cluster answers"
        print(f"executor: auto -> {name} ({why})")
    cfg.executor = name
    executors.executor_for(name, registry).check(cfg, args.config)  # before anything is registered
    if args.check_fit:  # the job's step in a fake world of its size (training/plan/): torch, on this CPU
        from training.tools import check_fit

        check_fit(cfg, args.config)
    if args.dry_run:
        return dry_run(cfg, executors.executor_for(name, registry))
    run = register_run(registry, cfg, name)
    fault("submit.registered")
    handle = executors.executor_for(name, registry).submit(run, cfg)
    print(f"submitted {run.id} ({handle}): {run.run_dir}")
    if not args.follow:
        print(f"  follow it: orch logs {run.id} --follow")
        return 0
    return follow(registry, run.id)


def dry_run(cfg, executor) -> int:
    """`orch submit --dry-run`: the resolved config and what the executor would be handed, under a run id drawn for
    the occasion; nothing is registered, written or queued."""
    from orchestrator.registry import Run, now
    from orchestrator.runs import new_run_id, run_folder

    run_id = new_run_id(cfg.name)
    run = Run(
        id=run_id,
        name=cfg.name,
        kind=cfg.kind,
        executor=executor.name,
        state="PENDING",
        run_dir=str(run_folder(cfg, run_id)),
        created_at=now(),
    )
    print(f"# ---- the resolved config ({run.run_dir}/config.yaml)")
    print(OmegaConf.to_yaml(cfg), end="")
    print(f"# ---- what the {executor.name} executor would be handed (run id {run.id} drawn for this dry run)")
    print(executor.dry_run(run, cfg), end="")
    print("# ---- dry run: nothing registered, written or queued")
    return 0


def submit_pipeline(path: str, overrides, follow: bool) -> int:
    pipeline = load_pipeline(path, overrides, find_run=run_names.finder())
    registry = Registry()
    pipeline_id, runs = pipelines.submit(pipeline, registry)
    print(f"submitted pipeline {pipeline_id} ({runs[0].executor}, {len(runs)} stages)")
    for run in runs:
        after = f" after {run.depends_on[len(pipeline_id) + 1 :]}" if run.depends_on else ""
        job = f" slurm job {run.slurm_job_id}" if run.slurm_job_id else ""
        print(f"  {run.stage}: {run.id}{after}{job}")
    if not follow:
        print(f"  follow it: orch pipeline wait {pipeline_id}")
        return 0
    return pipelines.wait(registry, pipeline_id)


REFRESH_EVERY_S = 5  # how often `--follow` asks the executor whether the run is still alive


def follow(registry: Registry, run_id: str) -> int:
    """Stream the run's log until it ends; return its exit status. Following is owning: the states the
    executor sees (a job sacct reports ended, a supervisor that died) are recorded as it goes."""
    executor = executors.executor_for(registry.get(run_id).executor, registry)
    pos, last_refresh = 0, 0.0
    while True:
        run = registry.get(run_id)
        if not run.finished and time.monotonic() - last_refresh > REFRESH_EVERY_S:
            executor.refresh([run])
            run, last_refresh = registry.get(run_id), time.monotonic()
        log = executor.log_path(run)
        if log.exists():
            with open(log, "rb") as f:
                f.seek(pos)
                chunk = f.read()
                pos += len(chunk)
            if chunk:
                sys.stdout.write(chunk.decode(errors="replace"))
                sys.stdout.flush()
        if run.finished and (not log.exists() or log.stat().st_size == pos):
            print(
                f"[orch] {run_id} {run.state}" + (f": {run.reason}" if run.reason and run.state != "COMPLETED" else "")
            )
            return 0 if run.state == "COMPLETED" else (run.exit_code or 1)
        time.sleep(0.5)  # a log tail, not synchronization: the registry state decides when to stop


def cmd_logs(args) -> int:
    registry = Registry()
    run = registry.find(args.run)
    if args.follow:
        return follow(registry, run.id)
    log = executors.executor_for(run.executor, registry).log_path(run)
    if log.exists():
        sys.stdout.write(log.read_text(errors="replace"))
    else:
        print(f"{run.id} has no log yet ({run.state}; expected at {log})", file=sys.stderr)
    return 0


def cmd_runs(args) -> int:
    from rich.console import Console
    from rich.table import Table

    registry = Registry()
    runs = executors.observed(registry, registry.list(limit=args.limit))
    if args.json:  # one object per run for scripts: the columns' fields, with typed values
        _print_json(
            [
                {
                    "id": r.id,
                    "kind": r.kind,
                    "executor": r.executor,
                    "state": r.state,
                    "attempts": r.attempts,
                    "created_at": r.created_at,
                    "pipeline": r.pipeline_id,
                    "stage": r.stage,
                    "run_dir": r.run_dir,
                    "reason": r.reason,
                    "slurm_job_id": r.slurm_job_id,
                    "code": code_snapshot.as_dict(r.run_dir),  # resources.code: what it runs (commit, diff hash)
                }
                for r in runs
            ]
        )
        return 0
    header = ("run", "kind", "executor", "state", "attempts", "created", "code", "pipeline", "stage", "folder / reason")
    rows = []
    for run in runs:
        created = time.strftime("%m-%d %H:%M", time.localtime(run.created_at))
        detail = run.reason if run.state in ("FAILED", "CANCELLED", "LOST") and run.reason else run.run_dir
        rows.append(
            (
                run.id,
                run.kind,
                run.executor,
                run.state,
                str(run.attempts),
                created,
                code_snapshot.describe(code_snapshot.read(run.run_dir)),
                run.pipeline_id or "-",
                run.stage or "-",
                detail,
            )
        )
    if not sys.stdout.isatty():  # pipes and scripts get plain, unwrapped columns
        for row in [header, *rows]:
            print("  ".join(row))
        return 0
    table = Table(*header)
    for row in rows:
        table.add_row(*row)
    Console().print(table)
    return 0


def cmd_cancel(args) -> int:
    """Ask the run to stop; then (unless --no-wait) wait until it has saved and stopped, recording that, so that
    an `orch resume` right after finds it CANCELLED."""
    registry = Registry()
    if sweeps.is_sweep(registry, args.run):  # a sweep's id: every unfinished member
        return sweeps.cmd_sweep_cancel(argparse.Namespace(sweep=args.run))
    run = registry.find(args.run)
    if run.finished:
        print(f"{run.id} already {run.state}")
        return 0
    executor = executors.executor_for(run.executor, registry)
    executor.cancel(run)
    print(f"cancelling {run.id}: it saves a checkpoint, then stops", flush=True)
    deadline = time.monotonic() + args.timeout
    while not args.no_wait:
        executor.refresh([registry.get(run.id)])
        run = registry.get(run.id)
        if run.finished:
            print(f"{run.id} {run.state}")
            break
        if time.monotonic() > deadline:
            print(f"{run.id} is still {run.state} after {args.timeout:.0f}s; `orch runs` shows when it has stopped")
            break
        time.sleep(1)  # polling the backend (the supervisor's record, sacct): its state decides when we stop
    return 0


def cmd_resume(args) -> int:
    """Start a finished run again on its folder; the trainer resumes from the newest checkpoint."""
    registry = Registry()
    if sweeps.is_sweep(registry, args.run):  # a sweep's id: every member that ended without completing
        return sweeps.cmd_sweep_resume(argparse.Namespace(sweep=args.run))
    run = registry.find(args.run)
    executor = executors.executor_for(run.executor, registry)
    executor.refresh([run])  # a run whose supervisor or job is gone is recorded so before we decide
    run = registry.get(run.id)
    if not run.finished:
        return _fail(
            f"{run.id} is {run.state}: only a finished run can be resumed"
            + (
                " (it is saving a checkpoint and stopping; resume it once `orch runs` shows CANCELLED)"
                if run.state == "CANCELLING"
                else f" (`orch cancel {run.id}` first)"
            )
        )
    handle = executor.resume(run)
    print(f"resumed {run.id} ({handle}): {run.run_dir}")
    if not args.follow:
        return 0
    return follow(registry, run.id)


def cmd_reconcile(args) -> int:
    """Record what the executors see (dead supervisors, jobs that ended) and settle pipelines' stages."""
    registry = Registry()
    if not args.target:
        runs = registry.list()
    else:
        try:
            runs = pipelines.stages(registry, registry.find_pipeline(args.target))
        except LookupError:
            runs = [registry.find(args.target)]
    runs = [r for r in runs if not r.finished]
    for name in {r.executor for r in runs if not r.pipeline_id}:
        executors.executor_for(name, registry).refresh([r for r in runs if r.executor == name and not r.pipeline_id])
    for pipeline_id in {r.pipeline_id for r in runs if r.pipeline_id}:
        pipelines.reconcile(registry, pipeline_id)
    for run in runs:
        now = registry.get(run.id)
        if now.state != run.state:
            print(f"{run.id}: {run.state} -> {now.state}" + (f" ({now.reason})" if now.reason else ""))
    return 0


def cmd_pipeline(args) -> int:
    registry = Registry()
    pipeline_id = registry.find_pipeline(args.pipeline)
    if args.action == "wait":
        return pipelines.wait(registry, pipeline_id, timeout=args.timeout)
    if args.action == "cancel":
        for run in pipelines.cancel(registry, pipeline_id):  # CANCELLED only once its backend has stopped it
            print(f"  {run.stage}: {run.id} {run.state}")
        print(f"cancelling pipeline {pipeline_id}: `orch pipeline wait {pipeline_id}` follows it until it stops")
        return 0
    if args.action == "reconcile":
        pipelines.reconcile(registry, pipeline_id)
    header = ("stage", "run", "kind", "after", "state", "slurm job", "folder / reason")
    rows = pipelines.status_rows(registry, pipeline_id)
    if args.json:
        keys = ("stage", "run", "kind", "after", "state", "slurm_job_id", "detail")
        _print_json({"pipeline": pipeline_id, "stages": [dict(zip(keys, row)) for row in rows]})
        return 0
    for row in [header, *rows]:
        print("  ".join(row))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="orch", description="Train GPT models on this machine or a Slurm cluster.")
    p.add_argument("--version", action="version", version=f"orch {_version()}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("submit", help="submit a job described by a YAML file")
    s.add_argument("config", nargs="?", help="a job or pipeline YAML file, e.g. jobs/pretrain.yaml")
    s.add_argument("overrides", nargs="*", help="key=value, e.g. train.max_steps=50")
    s.add_argument("--follow", "-f", action="store_true", help="stream the log and exit with the job's status")
    s.add_argument(
        "--check-fit",
        action="store_true",
        help="refuse (exit 2) a job whose plan (orch plan) exceeds its GPUs' memory, before queueing it",
    )
    s.add_argument(
        "--dry-run",
        action="store_true",
        help="print the resolved config and the batch script sbatch would receive (Slurm) or the trainer's command "
        "line (local); queue and register nothing",
    )
    s.set_defaults(func=cmd_submit)

    s = sub.add_parser("config", help="print the resolved config of a job file")
    s.add_argument("config", nargs="?", help="a job or pipeline YAML file, e.g. jobs/pretrain.yaml")
    s.add_argument("overrides", nargs="*", help="key=value, e.g. model.n_layer=8")
    s.add_argument("--json", action="store_true", help="print it as JSON (a pipeline: one object per stage)")
    s.set_defaults(func=cmd_config)

    s = sub.add_parser("runs", help="list runs")
    s.add_argument("--limit", type=int, default=50, help="show the newest N runs (default 50)")
    s.add_argument("--json", action="store_true", help="print a JSON list of runs, for scripts")
    s.set_defaults(func=cmd_runs)

    from orchestrator.status.live import add_parser as add_status_parser

    add_status_parser(sub)  # `orch status`: the live dashboard

    from orchestrator.sweeps.command import add_parser as add_sweep_parser

    add_sweep_parser(sub)  # `orch sweep fit|status|cancel|resume`: scaling-law sweeps

    from orchestrator.tracker_sync import add_parser as add_sync_parser

    add_sync_parser(sub)  # `orch sync RUN`: upload an offline W&B run

    s = sub.add_parser("logs", help="print a run's log")
    s.add_argument("run", help="run id (or a unique prefix), as `orch runs` lists it")
    s.add_argument("--follow", "-f", action="store_true", help="keep printing until the run ends")
    s.set_defaults(func=cmd_logs)

    s = sub.add_parser("cancel", help="cancel a run (it checkpoints first)")
    s.add_argument("run", help="run id (or a unique prefix), as `orch runs` lists it")
    s.add_argument("--no-wait", action="store_true", help="return at once; the run is CANCELLING until it has stopped")
    s.add_argument("--timeout", type=float, default=600, help="seconds to wait for it to stop (default 600)")
    s.set_defaults(func=cmd_cancel)

    s = sub.add_parser("resume", help="start a finished or failed run again; it continues from its checkpoint")
    s.add_argument("run", help="run id (or a unique prefix), as `orch runs` lists it")
    s.add_argument("--follow", "-f", action="store_true", help="stream the log and exit with the job's status")
    s.set_defaults(func=cmd_resume)

    s = sub.add_parser("reconcile", help="record runs whose supervisor or job is gone; settle pipelines' stages")
    s.add_argument("target", nargs="?", help="one run or pipeline id (or a prefix); default: every unfinished run")
    s.set_defaults(func=cmd_reconcile)

    s = sub.add_parser("pipeline", help="a pipeline's stages: status, wait for them, cancel them, reconcile them")
    s.add_argument("action", choices=["status", "wait", "cancel", "reconcile"], help="what to do with its stages")
    s.add_argument("pipeline", help="pipeline id (or a prefix of it), printed by `orch submit PIPELINE.yaml`")
    s.add_argument("--timeout", type=float, default=None, help="wait: give up after this many seconds (exit 2)")
    s.add_argument("--json", action="store_true", help="status: print the stages as JSON, for scripts")
    s.set_defaults(func=cmd_pipeline)

    from training.tools import add_commands  # the data plane's entry point for in-process commands

    add_commands(sub)  # generate, chat, serve, export, data prepare, plan
    return p


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("orch")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


def _unknown_command(parser: argparse.ArgumentParser, argv: list[str]) -> str | None:
    """'orch sumbit ...' -> a sentence naming the command meant, or None when argv's command exists."""
    commands = next(a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    word = next((a for a in argv if not a.startswith("-")), None)
    if word is None or word in commands:
        return None
    near = difflib.get_close_matches(word, list(commands), n=1)
    hint = f"; did you mean `orch {near[0]}`?" if near else f"; the commands: {', '.join(commands)}"
    return f"unknown command {word!r}{hint}"


def main(argv=None) -> None:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    unknown = _unknown_command(parser, argv)
    if unknown:
        sys.exit(_fail(unknown))
    args = parser.parse_args(argv)
    try:
        code = args.func(args)
    except SpecError as e:
        code = _fail(str(e), e.exit_code)
    except LookupError as e:
        code = _fail(str(e).strip("'\""))
    except BrokenPipeError:  # `orch runs | head`: the reader had enough
        code = 0
    except (ValueError, OSError, RuntimeError) as e:
        # Data, checkpoint and file errors carry a sentence for the user; ORCH_DEBUG=1 shows the traceback.
        if os.environ.get("ORCH_DEBUG"):
            raise
        code = _fail(str(e) or type(e).__name__)
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
