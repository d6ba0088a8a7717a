"""python -m bench.chaos --faults N --seed S [--executor local|slurm] [--kinds 1,2,...] [--doc]

Draws N faults (seeded; the seed is printed), runs each against the tiny chaos job, and writes
bench/results/chaos-<device>-<date>.json; --doc also puts the table into docs/reliability.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.chaos.config import DATA, JOB, REPO
from bench.chaos.kinds import KINDS, Context
from bench.chaos.reference import References
from bench.chaos.report import update_doc
from bench.chaos.run import FIGURES, draw, draw_one, print_row, row_of, run_one, tabulate
from bench.common import RESULTS, device_name, device_slug, versions
from jobspec import atomic


def prepare_data(root: Path) -> Path:
    data_dir = root / "data"
    if not (data_dir / "meta.json").is_file():
        env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
        subprocess.run(
            [sys.executable, "-m", "orchestrator.cli", "data", "prepare", str(JOB), *DATA, f"data.dir={data_dir}"],
            cwd=root,
            env=env,
            check=True,
            capture_output=True,
        )
    return data_dir


def context(root: Path, data_dir: Path | None = None) -> Context:
    """The benchmark's shared state under `root`; data_dir: the chaos job's data, prepared already (tests)."""
    root.mkdir(parents=True, exist_ok=True)
    data_dir = data_dir or prepare_data(root)
    return Context(root, data_dir, References(root, data_dir))


def write_results(path: Path, rows: list[dict], *, planned: int, **about) -> dict:
    record = {
        "name": "chaos",
        "device": device_name(),
        "versions": versions(),
        **about,
        "planned": planned,
        **tabulate(rows),
        "rows": rows,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_json(path, record)
    return record


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m bench.chaos", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--faults", type=int, default=100)
    p.add_argument("--seed", type=int, default=None, help="default: a random seed (printed)")
    p.add_argument(
        "--executor",
        choices=["local", "slurm"],
        default="local",
        help="slurm: every kind that can run there does (kinds 6, 7, 8, 11, 12 are local-only; 3 and "
        "13 are Slurm-only)",
    )
    p.add_argument("--kinds", default=",".join(str(k) for k in KINDS), help="which kinds, e.g. 1,5")
    p.add_argument("--fault-seed", type=int, default=None, help="replay one fault: its kind (--kinds K) and seed")
    p.add_argument(
        "--work",
        default=os.path.join(tempfile.gettempdir(), "orch-chaos"),
        help="data, cached reference runs and each fault's folder (default: %(default)s)",
    )
    p.add_argument("--keep", action="store_true", help="keep the folders of faults that went well too")
    p.add_argument("--doc", action="store_true", help="write the table into docs/reliability.md")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    kinds = [int(k) for k in args.kinds.split(",")]
    seed = args.seed if args.seed is not None else random.randrange(1_000_000)
    if args.fault_seed is not None:
        faults = [draw_one(kinds[0], args.fault_seed, args.executor)]
    else:
        faults = draw(args.faults, seed, kinds, args.executor)
    command = "python -m bench.chaos " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    if args.seed is None and args.fault_seed is None:
        command += f" --seed {seed}"
    what = f"kind {kinds[0]}, fault seed {args.fault_seed}" if args.fault_seed is not None else f"seed {seed}"
    print(f"[chaos] {what}: {len(faults)} faults; replay: {command}", flush=True)
    ctx = context(Path(args.work))
    rows = []
    date = datetime.date.today().isoformat()
    path = RESULTS / f"chaos-{device_slug()}-{date}.json"
    for i, fault in enumerate(faults, 1):
        out, seconds = run_one(fault, ctx)
        rows.append(row_of(fault, out, seconds))
        print_row(i, len(faults), rows[-1])
        workspace = Path(args.work) / "faults" / f"{ctx.count:03d}-k{fault.kind}-{fault.seed}-{ctx.started}"
        if out.ok and not args.keep:
            shutil.rmtree(workspace, ignore_errors=True)
        # Rewritten after every fault: an interrupted run of hours keeps the table of the faults it ran.
        record = write_results(
            path, rows, date=date, command=command, seed=seed, executor=args.executor, planned=len(faults)
        )
    figures = tabulate(rows)
    print(f"[chaos] {json.dumps({k: figures[k] for k in ('faults', *FIGURES, 'recovery_s')})}")
    print(f"[chaos] wrote {path}")
    if args.doc:
        update_doc(record)
    return 0 if all(r["outcome"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
