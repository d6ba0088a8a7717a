"""`orch`: the command line. Each subcommand is a small function; argparse wires them."""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

from orchestrator.registry import Registry, Run, now
from orchestrator.spec import SpecError, load_spec


def _fail(msg: str, code: int = 2) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return code


def new_run_id(name: str) -> str:
    return f"{name}-{secrets.token_hex(3)}"


def cmd_config(args) -> int:
    from orchestrator import pipeline

    if pipeline.is_pipeline_file(args.config):
        return pipeline.print_configs(args.config, args.overrides)
    cfg = load_spec(args.config, args.overrides)
    print(OmegaConf.to_yaml(cfg), end="")
    return 0


def cmd_submit(args) -> int:
    from orchestrator import pipeline

    if pipeline.is_pipeline_file(args.config):  # kind: pipeline -> a chain of stages
        return pipeline.submit_from_cli(args.config, args.overrides, follow=args.follow)
    cfg = load_spec(args.config, args.overrides)
    executor = resolve_executor(cfg.executor)
    registry = Registry()
    run_id = new_run_id(cfg.name)
    run_dir = (Path(cfg.runs_dir) / run_id).resolve()
    run_dir.mkdir(parents=True)
    OmegaConf.save(cfg, run_dir / "config.yaml")
    run = Run(id=run_id, name=cfg.name, kind=cfg.kind, executor=executor, state="PENDING",
              run_dir=str(run_dir), created_at=now())
    registry.add(run)
    if executor == "slurm":
        from orchestrator.executors import slurm

        job_id = slurm.submit(run, registry, cfg)
        print(f"submitted {run_id} (slurm job {job_id}): {run_dir}")
    else:
        from orchestrator.executors import local

        local.launch(run, registry)
        print(f"submitted {run_id} ({executor}): {run_dir}")
    if not args.follow:
        print(f"  follow it: orch logs {run_id} --follow")
        return 0
    return follow(registry, run_id)


def resolve_executor(executor: str) -> str:
    """auto -> slurm when sbatch is on PATH and slurmctld answers, else local."""
    if executor != "auto":
        return executor
    from orchestrator.cluster import slurm_available

    return "slurm" if slurm_available() else "local"


def log_path(run: Run) -> Path:
    """The log `orch logs` shows: the trainer's (local) or rank 0's submitit log (Slurm)."""
    if run.executor == "slurm":
        from orchestrator.executors import slurm

        return slurm.log_file(run) or Path(run.run_dir) / "slurm" / f"{run.slurm_job_id}_0_log.out"
    return Path(run.run_dir) / "logs" / "train.log"


def follow(registry: Registry, run_id: str) -> int:
    """Stream the run's log until it ends; return its exit status."""
    run = registry.get(run_id)
    log = log_path(run)
    pos = 0
    last_refresh = 0.0
    while True:
        run = registry.get(run_id)
        if run.executor == "slurm" and not run.finished and time.monotonic() - last_refresh > 5:
            from orchestrator.executors import slurm  # nobody else updates a Slurm run's state: ask sacct

            slurm.refresh(registry, [run])
            run, last_refresh = registry.get(run_id), time.monotonic()
        if log.exists():
            with open(log, "rb") as f:
                f.seek(pos)
                chunk = f.read()
                pos += len(chunk)
            if chunk:
                sys.stdout.write(chunk.decode(errors="replace"))
                sys.stdout.flush()
        if run.finished and (not log.exists() or log.stat().st_size == pos):
            print(f"[orch] {run_id} {run.state}" + (f": {run.reason}" if run.reason and run.state != "COMPLETED" else ""))
            return 0 if run.state == "COMPLETED" else (run.exit_code or 1)
        time.sleep(0.5)  # a log tail, not synchronization: the registry state decides when to stop


def cmd_logs(args) -> int:
    registry = Registry()
    run = registry.find(args.run)
    if args.follow:
        return follow(registry, run.id)
    log = log_path(run)
    if log.exists():
        sys.stdout.write(log.read_text(errors="replace"))
    else:
        print(f"{run.id} has no log yet ({run.state}; expected at {log})", file=sys.stderr)
    return 0


def cmd_runs(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from orchestrator.pipeline import check_pipelines

    registry = Registry()
    check_pipelines(registry)  # Slurm stages whose parent failed: cancel them rather than show them PENDING
    refresh_slurm_runs(registry)
    header = ("run", "kind", "executor", "state", "attempts", "created", "pipeline", "stage", "folder / reason")
    rows = []
    for run in registry.list(limit=args.limit):
        created = time.strftime("%m-%d %H:%M", time.localtime(run.created_at))
        detail = run.reason if run.state in ("FAILED", "CANCELLED") and run.reason else run.run_dir
        rows.append((run.id, run.kind, run.executor, run.state, str(run.attempts), created,
                     run.pipeline_id or "-", run.stage or "-", detail))
    if not sys.stdout.isatty():  # pipes and scripts get plain, unwrapped columns
        for row in [header, *rows]:
            print("  ".join(row))
        return 0
    table = Table(*header)
    for row in rows:
        table.add_row(*row)
    Console().print(table)
    return 0


def refresh_slurm_runs(registry: Registry) -> None:
    """Unfinished Slurm runs outside pipelines (check_pipelines does those): states from one sacct call."""
    live = [r for r in registry.list() if r.executor == "slurm" and not r.finished and not r.pipeline_id]
    if live:
        from orchestrator.executors import slurm

        slurm.refresh(registry, live)


def cmd_cancel(args) -> int:
    import signal

    registry = Registry()
    run = registry.find(args.run)
    if run.finished:
        print(f"{run.id} already {run.state}")
        return 0
    if run.executor == "slurm":
        from orchestrator.executors import slurm

        slurm.cancel(run)  # the trainer checkpoints on scancel's SIGTERM
        registry.update(run.id, state="CANCELLED", reason="cancelled by user", ended_at=now())
    elif run.pid:
        try:
            os.kill(run.pid, signal.SIGTERM)  # the supervisor forwards it and records CANCELLED
        except ProcessLookupError:
            registry.update(run.id, state="CANCELLED", reason="cancelled by user", ended_at=now())
    else:
        registry.update(run.id, state="CANCELLED", reason="cancelled by user", ended_at=now())
    print(f"cancelling {run.id}")
    return 0


def cmd_resume(args) -> int:
    """Start a finished run again on its folder; the trainer resumes from the newest checkpoint."""
    registry = Registry()
    run = registry.find(args.run)
    if run.executor == "slurm":
        from orchestrator.executors import slurm

        slurm.refresh(registry, [run])
        run = registry.get(run.id)
    if not run.finished:
        return _fail(f"{run.id} is {run.state}: only a finished run can be resumed (`orch cancel {run.id}` first)")
    if run.executor == "slurm":
        job_id = slurm.resume(run, registry)
        print(f"resumed {run.id} (slurm job {job_id}): {run.run_dir}")
    else:
        from orchestrator.executors import local

        registry.update(run.id, state="PENDING", ended_at=None, exit_code=None, reason=None)
        local.launch(registry.get(run.id), registry)
        print(f"resumed {run.id} (local): {run.run_dir}")
    if not args.follow:
        return 0
    return follow(registry, run.id)


def cmd_data_prepare(args) -> int:
    from training.data import DataError
    from training.data.prepare import prepare_data

    overrides = list(args.overrides)
    config = args.config
    if config and "=" in config and not config.endswith((".yaml", ".yml")):
        overrides.insert(0, config)  # `orch data prepare data.vocab_size=8192`: no file given
        config = None
    if config is None:
        config = str(Path(__file__).resolve().parents[1] / "jobs" / "pretrain.yaml")
    cfg = load_spec(config, overrides)
    try:
        prepare_data(cfg.data, progress=True)
    except DataError as e:
        return _fail(str(e))
    return 0


def cmd_pipeline(args) -> int:
    from orchestrator import pipeline

    registry = Registry()
    pipeline_id = registry.find_pipeline(args.pipeline)
    if args.action == "wait":
        return pipeline.wait(registry, pipeline_id, timeout=args.timeout)
    if args.action == "cancel":
        pipeline.cancel(registry, pipeline_id)
        print(f"cancelling pipeline {pipeline_id}")
        return 0
    pipeline.check_pipelines(registry, pipeline_id)
    for row in [("stage", "run", "kind", "after", "state", "slurm job", "folder / reason"),
                *pipeline.status_rows(registry, pipeline_id)]:
        print("  ".join(row))
    return 0


def cmd_cluster(args) -> int:
    from orchestrator import cluster

    if args.action == "up":
        cluster.cluster_up()
    elif args.action == "down":
        cluster.cluster_down()
    else:
        import json

        print(json.dumps(cluster.cluster_status(), indent=1))
    return 0


def cmd_export(args) -> int:
    from training.peft_export import export

    out, what = export(args.source, args.hf, merge=args.merge)
    print(f"exported {args.source} -> {out} ({what})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="orch", description="Train GPT models on this machine or a Slurm cluster.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("submit", help="submit a job described by a YAML file")
    s.add_argument("config")
    s.add_argument("overrides", nargs="*", help="key=value, e.g. train.max_steps=50")
    s.add_argument("--follow", "-f", action="store_true", help="stream the log and exit with the job's status")
    s.set_defaults(func=cmd_submit)

    s = sub.add_parser("config", help="print the resolved config of a job file")
    s.add_argument("config")
    s.add_argument("overrides", nargs="*")
    s.set_defaults(func=cmd_config)

    s = sub.add_parser("runs", help="list runs")
    s.add_argument("--limit", type=int, default=50)
    s.set_defaults(func=cmd_runs)

    from orchestrator.status.live import add_parser as add_status_parser

    add_status_parser(sub)  # `orch status`: the live dashboard

    s = sub.add_parser("logs", help="print a run's log")
    s.add_argument("run")
    s.add_argument("--follow", "-f", action="store_true")
    s.set_defaults(func=cmd_logs)

    s = sub.add_parser("cancel", help="cancel a run (it checkpoints first)")
    s.add_argument("run")
    s.set_defaults(func=cmd_cancel)

    s = sub.add_parser("resume", help="start a finished or failed run again; it continues from its checkpoint")
    s.add_argument("run")
    s.add_argument("--follow", "-f", action="store_true", help="stream the log and exit with the job's status")
    s.set_defaults(func=cmd_resume)

    s = sub.add_parser("export", help="export a run or checkpoint to the Hugging Face Llama layout")
    s.add_argument("source", help="a run folder or a checkpoint folder")
    s.add_argument("--hf", required=True, metavar="OUT", help="output folder")
    s.add_argument("--merge", action="store_true",
                   help="a LoRA run: write its base with the adapters merged in, instead of base + PEFT adapter")
    s.set_defaults(func=cmd_export)

    from training.evaluate import sample  # torch is imported only when a command runs

    s = sub.add_parser("generate", help="continue a prompt with a trained model, streaming the text")
    sample.add_sampling_args(s)
    s.add_argument("--prompt", required=True, help="the text to continue (\\n for a newline)")
    s.set_defaults(func=lambda args: sample.cmd_generate(args))

    s = sub.add_parser("chat", help="talk to a fine-tuned model in the chat template")
    sample.add_sampling_args(s)
    s.set_defaults(func=lambda args: sample.cmd_chat(args))

    s = sub.add_parser("pipeline", help="a pipeline's stages: status, wait for them, cancel them")
    s.add_argument("action", choices=["status", "wait", "cancel"])
    s.add_argument("pipeline", help="pipeline id (or a prefix of it), printed by `orch submit PIPELINE.yaml`")
    s.add_argument("--timeout", type=float, default=None, help="wait: give up after this many seconds (exit 2)")
    s.set_defaults(func=cmd_pipeline)

    s = sub.add_parser("cluster", help="the local Slurm cluster (slurm/cluster.sh)")
    s.add_argument("action", choices=["up", "down", "status"])
    s.set_defaults(func=cmd_cluster)

    data = sub.add_parser("data", help="data preparation").add_subparsers(dest="data_command", required=True)
    s = data.add_parser("prepare", help="tokenize sources into MDS shards (a job file's data: section)")
    s.add_argument("config", nargs="?", help="job YAML whose data: section to use (default: jobs/pretrain.yaml)")
    s.add_argument("overrides", nargs="*")
    s.set_defaults(func=cmd_data_prepare)
    return p


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
    except SpecError as e:
        code = _fail(str(e), e.exit_code)
    except LookupError as e:
        code = _fail(str(e).strip("'\""))
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
