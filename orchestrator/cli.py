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
    cfg = load_spec(args.config, args.overrides)
    print(OmegaConf.to_yaml(cfg), end="")
    return 0


def cmd_submit(args) -> int:
    cfg = load_spec(args.config, args.overrides)
    executor = cfg.executor if cfg.executor != "auto" else "local"
    if executor != "local":
        return _fail(f"{args.config}: executor={executor!r} is not available yet; use executor=local")
    from orchestrator.executors import local

    registry = Registry()
    run_id = new_run_id(cfg.name)
    run_dir = (Path(cfg.runs_dir) / run_id).resolve()
    run_dir.mkdir(parents=True)
    OmegaConf.save(cfg, run_dir / "config.yaml")
    run = Run(id=run_id, name=cfg.name, kind=cfg.kind, executor=executor, state="PENDING",
              run_dir=str(run_dir), created_at=now())
    registry.add(run)
    local.launch(run, registry)
    print(f"submitted {run_id} ({executor}): {run_dir}")
    if not args.follow:
        print(f"  follow it: orch logs {run_id} --follow")
        return 0
    return follow(registry, run_id)


def follow(registry: Registry, run_id: str) -> int:
    """Stream the run's log until it ends; return its exit status."""
    run = registry.get(run_id)
    log = Path(run.run_dir) / "logs" / "train.log"
    pos = 0
    while True:
        run = registry.get(run_id)
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
    log = Path(run.run_dir) / "logs" / "train.log"
    if log.exists():
        sys.stdout.write(log.read_text(errors="replace"))
    return 0


def cmd_runs(args) -> int:
    from rich.console import Console
    from rich.table import Table

    header = ("run", "kind", "executor", "state", "attempts", "created", "folder / reason")
    rows = []
    for run in Registry().list(limit=args.limit):
        created = time.strftime("%m-%d %H:%M", time.localtime(run.created_at))
        detail = run.reason if run.state in ("FAILED", "CANCELLED") and run.reason else run.run_dir
        rows.append((run.id, run.kind, run.executor, run.state, str(run.attempts), created, detail))
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
    import signal

    registry = Registry()
    run = registry.find(args.run)
    if run.finished:
        print(f"{run.id} already {run.state}")
        return 0
    if run.pid:
        try:
            os.kill(run.pid, signal.SIGTERM)  # the supervisor forwards it and records CANCELLED
        except ProcessLookupError:
            registry.update(run.id, state="CANCELLED", reason="cancelled by user", ended_at=now())
    else:
        registry.update(run.id, state="CANCELLED", reason="cancelled by user", ended_at=now())
    print(f"cancelling {run.id}")
    return 0


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
    from model.hf import export_hf

    out = export_hf(args.source, args.hf)
    print(f"exported {args.source} -> {out} (Hugging Face Llama layout)")
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

    s = sub.add_parser("logs", help="print a run's log")
    s.add_argument("run")
    s.add_argument("--follow", "-f", action="store_true")
    s.set_defaults(func=cmd_logs)

    s = sub.add_parser("cancel", help="cancel a run (it checkpoints first)")
    s.add_argument("run")
    s.set_defaults(func=cmd_cancel)

    s = sub.add_parser("export", help="export a run or checkpoint to the Hugging Face Llama layout")
    s.add_argument("source", help="a run folder or a checkpoint folder")
    s.add_argument("--hf", required=True, metavar="OUT", help="output folder")
    s.set_defaults(func=cmd_export)

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
