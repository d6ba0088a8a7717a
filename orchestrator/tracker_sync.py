"""`orch sync RUN`: upload a run's offline W&B run (its nodes had no internet) with W&B's own `wandb sync`.

Every attempt of a run (each requeue or resume) wrote its own <run folder>/wandb/offline-run-* folder under the same
run id; `wandb sync` uploads them all into that one run, oldest first.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

from jobspec import SpecError
from orchestrator.registry import Registry


def offline_runs(run_dir: Path) -> list[Path]:
    """The run's offline W&B folders, oldest first (their names start with the time they began)."""
    return sorted(p for p in (run_dir / "wandb").glob("offline-run-*") if p.is_dir() and not p.is_symlink())


def sync_command(run_dir: Path) -> list[str]:
    """`wandb sync` on each of the run's offline folders; SpecError (exit 2) when there is nothing to sync or no
    wandb to sync it with."""
    folders = offline_runs(run_dir)
    if not folders:
        raise SpecError(
            f"{run_dir} has no offline W&B run (no wandb/offline-run-* folder): its job's logging.backends did "
            "not name wandb, or it ran with WANDB_MODE=online and is uploaded already"
        )
    if importlib.util.find_spec("wandb") is None:
        raise SpecError(
            "orch sync uploads with W&B's own `wandb sync`, but the wandb package is not installed here: "
            "pip install 'orch[wandb]' (then `wandb login` once), or run "
            f"`wandb sync {folders[0].parent}/offline-run-*` where it is"
        )
    return [sys.executable, "-m", "wandb", "sync", *map(str, folders)]


def cmd_sync(args) -> int:
    folder = Path(args.run)
    run_dir = folder.resolve() if folder.is_dir() else Path(Registry().find(args.run).run_dir)
    command = sync_command(run_dir)
    if args.dry_run:
        print(" ".join(command))
        return 0
    return subprocess.run(command).returncode


def add_parser(sub) -> None:
    s = sub.add_parser("sync", help="upload a run's offline W&B run (logging.backends: [wandb]) with `wandb sync`")
    s.add_argument("run", help="run id (or a unique prefix), as `orch runs` lists it, or a run folder")
    s.add_argument("--dry-run", action="store_true", help="print the `wandb sync` command instead of running it")
    s.set_defaults(func=cmd_sync)
