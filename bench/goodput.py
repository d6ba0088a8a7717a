"""Goodput (training/goodput.py) of a shortened demo pretrain, undisturbed and with one kill.

    python -m bench.goodput                       # 80 steps of 4 sequences, killed once inside step 40
    python -m bench.goodput --steps 300 --every 100 --kill-at 130 --micro-batch 16 --data-dir /tmp/demo-data

The demo job (jobs/pretrain.yaml: its model, data and recipe) shortened to --steps steps of --micro-batch sequences
(the demo's 16 would take 4 times as long), validating 8 batches and checkpointing every --every steps, eager
(train.compile=false: compiling is a fixed cost of a few tens of seconds that the full 1,200-step demo amortizes
and a short run does not), no time budget. Two runs of `python -m training.main` in one invocation:
  clean   undisturbed: goodput = productive / wall (Meta's effective training time ratio); and `steady`, the same
          without the one restart (process start to first step), what a long run tends to
  killed  SIGKILLed inside step --kill-at (a named fault point), then resumed from the last checkpoint: the steps
          trained again are the lost work. It is checked against two independent timings of those steps: the clean
          run's mean step time x the steps recomputed, and the recomputing attempt's own metrics.jsonl timestamps
          (log_every=1).
The demo's data are prepared once (`orch data prepare`) into --data-dir, outside the timings.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import write_result

REPO = Path(__file__).resolve().parents[1]
JOB = str(REPO / "jobs" / "pretrain.yaml")


def run_trainer(run_dir: Path, overrides: list[str], fault: str = "") -> int:
    env = dict(os.environ, PYTHONPATH=str(REPO), ORCH_FAULT=fault, ORCH_HOME=str(run_dir.parent / ".orch"))
    with open(run_dir.parent / f"{run_dir.name}.log", "a") as log:
        cmd = [sys.executable, "-m", "training.main", JOB, *overrides, "--run-dir", str(run_dir)]
        return subprocess.run(cmd, cwd=run_dir.parent, env=env, stdout=log, stderr=subprocess.STDOUT).returncode


def step_times(run_dir: Path, attempt_first_line: int) -> dict[int, float]:
    """The time of each training record of metrics.jsonl from the given line on (one attempt's records)."""
    times = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines()[attempt_first_line:]:
        record = json.loads(line)
        if "loss" in record:
            times[record["step"]] = record["time"]
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--every", type=int, default=25, help="checkpoint and validation interval")
    parser.add_argument("--kill-at", type=int, default=40, help="the step inside which the killed run dies")
    parser.add_argument("--micro-batch", type=int, default=4, help="sequences of 256 tokens per step")
    parser.add_argument("--data-dir", default=str(Path(tempfile.gettempdir()) / "orch-bench-goodput-data"))
    args = parser.parse_args()
    overrides = [
        f"data.dir={args.data_dir}",
        f"train.max_steps={args.steps}",
        f"train.micro_batch_size={args.micro_batch}",
        f"train.val_every={args.every}",
        "train.val_batches=8",
        "train.log_every=1",
        "train.time_budget_min=null",
        "train.compile=false",
        f"checkpoint.every={args.every}",
    ]
    if not (Path(args.data_dir) / "meta.json").exists():
        subprocess.run(
            [sys.executable, "-m", "orchestrator.cli", "data", "prepare", JOB, f"data.dir={args.data_dir}"],
            check=True,
            cwd=tempfile.gettempdir(),
            env=dict(os.environ, PYTHONPATH=str(REPO), ORCH_HOME=str(Path(args.data_dir).parent / ".orch-bench")),
        )
    with tempfile.TemporaryDirectory() as tmp:
        clean, killed = Path(tmp) / "clean", Path(tmp) / "killed"
        assert run_trainer(clean, overrides) == 0, (Path(tmp) / "clean.log").read_text()[-3000:]
        assert run_trainer(killed, overrides, fault=f"train.after_optimizer_step#{args.kill_at}:kill") != 0
        first_line = len((killed / "metrics.jsonl").read_text().splitlines())
        assert run_trainer(killed, overrides) == 0, (Path(tmp) / "killed.log").read_text()[-3000:]
        a, b = (json.loads((run / "goodput.json").read_text()) for run in (clean, killed))
        resumed = step_times(killed, first_line)
    last_checkpoint = (args.kill_at - 1) // args.every * args.every
    recomputed = list(range(last_checkpoint + 1, args.kill_at))  # the killed attempt died inside step kill_at
    clean_step_s = a["buckets_s"]["productive"] / args.steps
    # From the resumed attempt's records: the span from the first recomputed step's record to the last one's,
    # plus one step (the first recomputed step ran before its record)
    span = resumed[recomputed[-1]] - resumed[recomputed[0]]
    from_records = span * len(recomputed) / max(1, len(recomputed) - 1)
    lost = b["buckets_s"]["lost"]
    figures = {
        "clean": {
            "goodput": a["goodput"],
            "steady_goodput": round(a["buckets_s"]["productive"] / (a["wall_s"] - a["buckets_s"]["restart"]), 4),
            "wall_s": a["wall_s"],
            "buckets_s": a["buckets_s"],
            "buckets_sum_over_wall": round(sum(a["buckets_s"].values()) / a["wall_s"], 4),
        },
        "killed": {
            "goodput": b["goodput"],
            "wall_s": b["wall_s"],
            "attempts": b["attempts"],
            "buckets_s": b["buckets_s"],
            "buckets_sum_over_wall": round(sum(b["buckets_s"].values()) / b["wall_s"], 4),
            "lost_steps": b["lost_steps"],
            "recomputed_steps": len(recomputed),
            "lost_s": lost,
            "recomputed_s_at_clean_step_time": round(clean_step_s * len(recomputed), 3),
            "recomputed_s_from_records": round(from_records, 3),
            "lost_over_clean_estimate": round(lost / (clean_step_s * len(recomputed)), 4),
            "lost_over_records_estimate": round(lost / from_records, 4),
        },
    }
    config = {
        "job": "jobs/pretrain.yaml",
        "overrides": overrides[1:],
        "kill": f"train.after_optimizer_step#{args.kill_at}:kill",
        "runs": "python -m training.main, one process each, in one invocation: clean, killed, resumed",
    }
    print(json.dumps(figures, indent=1))
    print(write_result("goodput", config, figures))


if __name__ == "__main__":
    main()
