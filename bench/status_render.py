"""One `orch status` frame (collect + render to a string) over a registry of 1,000 runs.

    python -m bench.status_render               # 1,000 runs, 20 of them running
    python -m bench.status_render --runs 5000

The registry and run folders are real files in a temporary folder: each run has config.yaml, a
metrics.jsonl of 50 records and a checkpoint folder; 20 runs are RUNNING and get one new metrics line
before every frame, as a training job would append. The baseline, timed in the same process, is the
bare registry read (`Registry.list()`) that any frame must do; Slurm is not consulted (its two calls
cost whatever the cluster takes to answer, the same for 1 run or 1,000), and timed apart when it is up.
Target: the warm frame's median under 200 ms.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import tempfile
import time
from pathlib import Path

from rich.console import Console

from bench.common import write_result
from orchestrator.registry import Registry, Run
from orchestrator.executors.slurm import sacct_records
from orchestrator.status import slurm_query
from orchestrator.status.collect import Collector
from orchestrator.status.render import render

RUNNING = 20


def build(root: Path, n_runs: int, records: int) -> tuple[Registry, list[Path]]:
    registry = Registry(root / "registry.db")
    growing, t0 = [], time.time() - n_runs
    for i in range(n_runs):
        running = i >= n_runs - RUNNING
        pipeline = f"chain-{i // 4:05d}" if i < 200 else None  # 50 four-stage pipelines
        run_id = f"pretrain-{i:06x}"
        run_dir = root / "runs" / run_id
        (run_dir / "checkpoints" / "step_00000050").mkdir(parents=True)
        (run_dir / "logs").mkdir()
        (run_dir / "logs" / "train.log").write_text("".join(f"step {s} | loss 3.0\n" for s in range(records)))
        (run_dir / "config.yaml").write_text("kind: pretrain\ntrain:\n  max_steps: 1000\n  log_every: 20\n")
        with open(run_dir / "metrics.jsonl", "w") as f:
            for s in range(1, records + 1):
                record = {
                    "time": t0,
                    "step": s,
                    "loss": 4 - s / records,
                    "lr": 1e-3,
                    "grad_norm": 1.0,
                    "tokens_per_s": 5000.0,
                    "tokens_seen": 4096 * s,
                    "mfu": None,
                    "eta_s": 60.0,
                }
                f.write(json.dumps(record) + "\n")
        registry.add(
            Run(
                id=run_id,
                name="pretrain",
                kind="pretrain",
                executor="local",
                state="RUNNING" if running else "COMPLETED",
                run_dir=str(run_dir),
                created_at=t0 + i,
                started_at=t0 + i,
                ended_at=None if running else t0 + i + 1,
                attempts=1,
                pipeline_id=pipeline,
                stage=f"s{i % 4}" if pipeline else None,
                depends_on=f"pretrain-{i - 1:06x}" if pipeline and i % 4 else None,
            )
        )
        if running:
            growing.append(run_dir / "metrics.jsonl")
    return registry, growing


def frame_seconds(collector: Collector, width: int, height: int) -> float:
    start = time.perf_counter()
    frame = collector.collect()
    console = Console(width=width, height=height, file=io.StringIO(), color_system="truecolor", force_terminal=True)
    console.print(render(frame, width=width, height=height))
    console.file.getvalue()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=1000)
    ap.add_argument("--records", type=int, default=50, help="metrics lines already in each run's file")
    ap.add_argument("--frames", type=int, default=15)
    ap.add_argument("--width", type=int, default=120)
    ap.add_argument("--height", type=int, default=50)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="orch-bench-status-") as tmp:
        registry, growing = build(Path(tmp), args.runs, args.records)
        collector = Collector(registry, use_slurm=False)
        cold = frame_seconds(collector, args.width, args.height)  # reads every file once
        frames, baseline = [], []
        for k in range(args.frames):
            for path in growing:  # the running jobs log a step between refreshes
                with open(path, "a") as f:
                    f.write(
                        json.dumps(
                            {
                                "time": time.time(),
                                "step": args.records + k + 1,
                                "loss": 2.0,
                                "tokens_per_s": 5000.0,
                                "eta_s": 30.0,
                            }
                        )
                        + "\n"
                    )
            start = time.perf_counter()
            registry.list()
            baseline.append(time.perf_counter() - start)
            frames.append(frame_seconds(collector, args.width, args.height))
        slurm_ms = None
        if slurm_query.cluster_nodes().slurm == "up":
            start = time.perf_counter()
            slurm_query.cluster_nodes()
            sacct_records(["1"])
            slurm_ms = round(1000 * (time.perf_counter() - start), 1)
    frame_ms, base_ms = 1000 * statistics.median(frames), 1000 * statistics.median(baseline)
    figures = {
        "frame_ms": round(frame_ms, 1),
        "cold_frame_ms": round(1000 * cold, 1),
        "registry_read_ms": round(base_ms, 2),
        "frame_over_registry_read": round(frame_ms / base_ms, 1),
        "slurm_two_calls_ms": slurm_ms,
    }
    print(
        f"{args.runs} runs: frame {frame_ms:.1f} ms median of {args.frames} (first frame {1000 * cold:.0f} ms), "
        f"registry read alone {base_ms:.1f} ms -> {frame_ms / base_ms:.1f}x; target frame < 200 ms"
        + (f"; Slurm's two calls {slurm_ms} ms" if slurm_ms is not None else "")
    )
    print(
        "wrote",
        write_result(
            "status_render",
            {
                "runs": args.runs,
                "running": RUNNING,
                "records": args.records,
                "frames": args.frames,
                "width": args.width,
                "height": args.height,
            },
            figures,
        ),
    )


if __name__ == "__main__":
    main()
