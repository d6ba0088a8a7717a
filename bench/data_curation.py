"""Data curation throughput: documents and MB per second per core for each step and for the whole stage, and how
it scales, all in one invocation.

    python -m bench.data_curation                 # the demo corpus: 1 worker, then 2 workers, on this machine
    python -m bench.data_curation --slurm         # also a 1-node and a 2-node Slurm array run (slurm/cluster.sh up)
    python -m bench.data_curation --repeat 4      # the demo corpus' training files 4 times (copies are duplicates)

Per step: documents (MB) that step processed / CPU seconds it took, summed over tasks (time.process_time in each
task: other processes on a shared machine don't count). Whole stage: training documents / (wall seconds x
workers). Scaling efficiency: wall(1 worker) / wall(2 workers) / 2. Wall time does count other processes: on a
shared machine the efficiency is a lower bound; the result records the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from omegaconf import OmegaConf

from bench.common import write_result
from jobspec import load_spec
from training.data.curate.local import run_stage
from training.data.curate.plan import make_plan

REPO = Path(__file__).resolve().parents[1]
JOB = str(REPO / "jobs" / "data.yaml")


def local_run(root: Path, workers: int, overrides: list[str]) -> dict:
    run_dir = root / f"local-{workers}"
    run_dir.mkdir()
    cfg = load_spec(JOB, [*overrides, f"curate.workers={workers}"])
    OmegaConf.save(cfg, run_dir / "config.yaml")
    make_plan(cfg, run_dir, workers)
    start, cpu = time.perf_counter(), time.process_time()
    stats = run_stage(run_dir, workers)
    return dict(stats, wall=time.perf_counter() - start, main_cpu=time.process_time() - cpu)


def repeated_corpus(folder: Path, times: int) -> Path:
    """The demo training files `times` times over, as links (no copy of the bytes)."""
    from training.data.corpus import demo_files

    for k in range(times):
        for i, path in enumerate(demo_files("train")):
            (folder / f"{k}").mkdir(parents=True, exist_ok=True)
            os.symlink(path, folder / f"{k}" / f"{i:04d}_{path.name}")
    return folder


def per_step(stats: dict) -> dict:
    """docs/s and MB/s per core of each step: the documents it processed / the CPU seconds it took."""
    out = {}
    for step, cpu in stats["cpu_seconds"].items():
        docs, nbytes = stats["handled"].get(step, (0, 0))
        out[step] = {"cpu_s": round(cpu, 3), "docs": docs, "docs_per_s": round(docs / cpu, 1),
                     "mb_per_s": round(nbytes / 1e6 / cpu, 2)}
    return out


def whole(stats: dict, workers: int) -> dict:
    """Wall-clock throughput per core; with one worker (no pool) also per CPU second of the whole stage."""
    cpu = {"mb_per_cpu_s": round(stats["bytes_in"] / 1e6 / stats["main_cpu"], 2),
           "docs_per_cpu_s": round(stats["input_docs"] / stats["main_cpu"], 1)} if workers == 1 else {}
    return {**cpu, "wall_s": round(stats["wall"], 2), "docs_per_s_per_core": round(stats["input_docs"] / stats["wall"] / workers, 1),
            "mb_per_s_per_core": round(stats["bytes_in"] / 1e6 / stats["wall"] / workers, 2),
            "cpu_s_in_steps": round(sum(stats["cpu_seconds"].values()), 2),
            "wall_by_phase": stats["wall_seconds"]}


def slurm_run(root: Path, name: str, overrides: list[str]) -> dict:
    """Submit through `orch submit executor=slurm`; wall = first analyze task's start to the report job's end."""
    from orchestrator.executors.slurm_array import JOBS

    env = dict(os.environ, ORCH_HOME=str(root / ".orch"), PYTHONPATH=str(REPO))
    subprocess.run([sys.executable, "-m", "orchestrator.cli", "submit", JOB, *overrides, f"name={name}",
                    f"runs_dir={root / 'runs'}", "executor=slurm"], check=True, env=env, cwd=REPO,
                   capture_output=True, text=True, timeout=120)
    jobs_file = next((root / "runs").glob(f"{name}-*/slurm/{JOBS}"))
    ids = json.loads(jobs_file.read_text())
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        rows = _sacct(list(ids.values()))
        report = [r for r in rows if r["JobID"] == ids["report"]]
        if report and report[0]["State"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"):
            break
        time.sleep(2)  # polling sacct: the job's state decides
    assert report[0]["State"] == "COMPLETED", f"{name}: report job {report[0]}"
    starts = [_ts(r["Start"]) for r in rows if r["JobID"].startswith(ids["analyze"] + "_")]
    wall = _ts(report[0]["End"]) - min(starts)
    stats = json.loads((jobs_file.parent.parent / "stats.json").read_text())
    return {"wall_s": wall, "input_docs": stats["input_docs"], "shards": stats["shards"]}


def _sacct(ids: list[str]) -> list[dict]:
    fields = ["JobID", "State", "Start", "End"]
    out = subprocess.run(["sacct", "-X", "-n", "-P", "-j", ",".join(ids), "-o", ",".join(fields)],
                         capture_output=True, text=True, timeout=60).stdout
    return [dict(zip(fields, line.split("|"))) for line in out.splitlines() if line.count("|") == 3]


def _ts(value: str) -> float:
    return time.mktime(time.strptime(value, "%Y-%m-%dT%H:%M:%S"))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sources", default="demo", help="data.sources (default: the demo corpus)")
    p.add_argument("--shards", type=int, default=8, help="the same shards for every run")
    p.add_argument("--slurm", action="store_true", help="also 1-node vs 2-node Slurm array runs")
    p.add_argument("--repeat", type=int, default=1, help="corpus = the demo training files this many times")
    args = p.parse_args(argv)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-curation-") as tmp:
        root = Path(tmp)
        sources = args.sources if args.repeat == 1 else str(repeated_corpus(root / "corpus", args.repeat))
        overrides = [f"data.sources=[{sources}]", f"curate.shards={args.shards}"]
        one, two = local_run(root, 1, overrides), local_run(root, 2, overrides)
        figures = {"docs": one["input_docs"], "mb": round(one["bytes_in"] / 1e6, 2),
                   "per_step_1_worker": per_step(one), "stage_1_worker": whole(one, 1), "stage_2_workers": whole(two, 2),
                   "scaling_efficiency_2_workers": round(one["wall"] / two["wall"] / 2, 3)}
        if args.slurm:
            # cpus_per_task = a node's CPUs: one task per node at a time, so 1 node runs the shards one by one
            node = [*overrides, "resources.cpus_per_task=2"]
            one_node = slurm_run(root, "one-node", [*node, "resources.sbatch_extra=[--nodelist=node1]"])
            two_nodes = slurm_run(root, "two-nodes", node)
            figures.update(slurm_1_node=one_node, slurm_2_nodes=two_nodes,
                           slurm_scaling_efficiency=round(one_node["wall_s"] / two_nodes["wall_s"] / 2, 3))
    figures["load_average_before_after"] = [round(load_before[0], 2), round(os.getloadavg()[0], 2)]
    figures["note"] = ("shared machine: other agents' jobs ran at the same time (see the load averages); per-step "
                       "figures are CPU time, the stage and scaling figures wall time")
    path = write_result("data_curation", {"sources": args.sources, "repeat": args.repeat, "shards": args.shards, "cores": len(os.sched_getaffinity(0))},
                        figures)
    print(json.dumps(figures, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
