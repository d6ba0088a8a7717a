"""Data curation throughput: documents and MB per second per core for each step and for the whole stage, and how
it scales, all in one invocation.

    python -m bench.data_curation                 # the demo corpus: 1 worker, then 2 workers, on this machine
    python -m bench.data_curation --slurm         # also a 1-node and a 2-node Slurm array run (slurm/cluster.sh up)
    python -m bench.data_curation --repeat 4      # the demo corpus' training files 4 times (copies are duplicates)
    python -m bench.data_curation --near-copies 1000,10000,100000   # near-duplicate clustering alone, see below

Per step: documents (MB) that step processed / CPU seconds it took, summed over tasks (time.process_time in each
task: other processes on a shared machine don't count). Whole stage: training documents / (wall seconds x
workers). Scaling efficiency: wall(1 worker) / wall(2 workers) / 2. Wall time does count other processes: on a
shared machine the efficiency is a lower bound; the result records the load average before and after.

--near-copies N,...: the CPU seconds of near-duplicate clustering alone (clusters.near_duplicates, at jobs/data.yaml's
near_dedup settings) on N near copies of one template file, each with 3% of its lines rewritten, for each N: the
corpus of many templated files, where clustering must grow with N, not N^2. Signatures are made beforehand, untimed.
Up to 2,000 copies the same signatures are also clustered by the baseline that compared every pair of a bucket.
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
        out[step] = {
            "cpu_s": round(cpu, 3),
            "docs": docs,
            "docs_per_s": round(docs / cpu, 1),
            "mb_per_s": round(nbytes / 1e6 / cpu, 2),
        }
    return out


def whole(stats: dict, workers: int) -> dict:
    """Wall-clock throughput per core; with one worker (no pool) also per CPU second of the whole stage."""
    cpu = (
        {
            "mb_per_cpu_s": round(stats["bytes_in"] / 1e6 / stats["main_cpu"], 2),
            "docs_per_cpu_s": round(stats["input_docs"] / stats["main_cpu"], 1),
        }
        if workers == 1
        else {}
    )
    return {
        **cpu,
        "wall_s": round(stats["wall"], 2),
        "docs_per_s_per_core": round(stats["input_docs"] / stats["wall"] / workers, 1),
        "mb_per_s_per_core": round(stats["bytes_in"] / 1e6 / stats["wall"] / workers, 2),
        "cpu_s_in_steps": round(sum(stats["cpu_seconds"].values()), 2),
        "wall_by_phase": stats["wall_seconds"],
    }


def slurm_run(root: Path, name: str, overrides: list[str]) -> dict:
    """Submit through `orch submit executor=slurm`; wall = first analyze task's start to the report job's end."""
    from orchestrator.executors.slurm_array import JOBS

    env = dict(os.environ, ORCH_HOME=str(root / ".orch"), PYTHONPATH=str(REPO))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "orchestrator.cli",
            "submit",
            JOB,
            *overrides,
            f"name={name}",
            f"runs_dir={root / 'runs'}",
            "executor=slurm",
        ],
        check=True,
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
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
    out = subprocess.run(
        ["sacct", "-X", "-n", "-P", "-j", ",".join(ids), "-o", ",".join(fields)],
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    return [dict(zip(fields, line.split("|"))) for line in out.splitlines() if line.count("|") == 3]


def _ts(value: str) -> float:
    return time.mktime(time.strptime(value, "%Y-%m-%dT%H:%M:%S"))


EDIT_SHARE = 0.03  # a near copy: this share of the template's lines rewritten, as in tests/test_curation.py


def template_file() -> Path:
    """The first training file of the demo corpus of 2-4 KB: a typical small source file."""
    from training.data.corpus import demo_files

    return next(p for p in sorted(demo_files("train")) if 2_000 <= p.stat().st_size <= 4_000)


def near_copy_signatures(text: str, n: int, near, seed: int = 0):
    """MinHash signatures of n near copies of `text`, exactly as the analyze step computes them (units never span
    lines, so a copy's units are its lines' units, hashed once per template line)."""
    import random

    import numpy as np

    from training.data.curate.minhash import ngram_hashes, signatures, unit_hashes

    lines = text.lower().split("\n")
    units = [unit_hashes(line, near.unit) for line in lines]
    rng = random.Random(seed)
    edits = max(1, round(EDIT_SHARE * len(lines)))
    out = []
    for start in range(0, n, 5_000):  # batches: bounded memory for rensa's flat input
        shingles = []
        for _ in range(start, min(n, start + 5_000)):
            copy = list(units)
            for i in rng.sample(range(len(lines)), edits):
                copy[i] = unit_hashes(
                    f"    value_{rng.randrange(10**6)} = compute({rng.randrange(100)})  # changed", near.unit
                )
            shingles.append(ngram_hashes(np.concatenate(copy), near.ngram))
        out.append(signatures(shingles, near.num_perm, near.seed))
    return np.concatenate(out)


def all_pairs(sigs, bands: int, threshold: float):
    """The baseline: the clustering that compared every pair of an LSH bucket (connected components of the similar
    pairs). Quadratic in a bucket's size, so timed only up to ALL_PAIRS_UP_TO copies."""
    import numpy as np

    from training.data.curate.clusters import UnionFind
    from training.data.curate.minhash import band_keys

    uf, keys = UnionFind(len(sigs)), band_keys(sigs, bands)
    for b in range(bands):
        order = np.argsort(keys[:, b], kind="stable")
        k = keys[order, b]
        starts = np.flatnonzero(np.r_[True, k[1:] != k[:-1]])
        for s, e in zip(starts, np.r_[starts[1:], len(sigs)]):
            block = sigs[order[s:e]]
            for j in range(1, e - s):
                for i in np.flatnonzero((block[:j] == block[j]).mean(axis=1) >= threshold):
                    uf.union(int(order[s + i]), int(order[s + j]))
    return np.array([uf.find(i) for i in range(len(sigs))])


ALL_PAIRS_UP_TO = 2_000


def near_copies(counts: list[int]) -> dict:
    """CPU seconds of near_duplicates on n near copies of one template, for each n; how they grow; the all-pairs
    baseline on the same signatures where n is small enough."""
    from training.data.curate.clusters import near_duplicates

    near = load_spec(JOB, []).curate.near_dedup
    template = template_file()
    rows = []
    for n in counts:
        sigs = near_copy_signatures(template.read_text(), n, near)
        cpu = time.process_time()
        roots = near_duplicates(sigs, near.bands, near.threshold)
        cpu = time.process_time() - cpu
        rows.append(
            {
                "copies": n,
                "cpu_s": round(cpu, 3),
                "us_per_copy": round(cpu / n * 1e6, 1),
                "kept": int((roots == range(n)).sum()),
            }
        )
        if n <= ALL_PAIRS_UP_TO:
            base = time.process_time()
            base_roots = all_pairs(sigs, near.bands, near.threshold)
            base = time.process_time() - base
            rows[-1].update(
                all_pairs_cpu_s=round(base, 3),
                speedup=round(base / cpu, 1),
                all_pairs_kept=int((base_roots == range(n)).sum()),
            )
        print(rows[-1], flush=True)
    first = rows[0]
    for row in rows[1:]:  # 1.0: linear; copies ratio: quadratic would be that times more per copy
        row["per_copy_vs_first"] = round(row["us_per_copy"] / first["us_per_copy"], 2)
    return {
        "template": str(template.relative_to(template.parents[1])),
        "threshold": near.threshold,
        "bands": near.bands,
        "num_perm": near.num_perm,
        "edit_share": EDIT_SHARE,
        "runs": rows,
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sources", default="demo", help="data.sources (default: the demo corpus)")
    p.add_argument("--shards", type=int, default=8, help="the same shards for every run")
    p.add_argument("--slurm", action="store_true", help="also 1-node vs 2-node Slurm array runs")
    p.add_argument("--repeat", type=int, default=1, help="corpus = the demo training files this many times")
    p.add_argument(
        "--near-copies",
        default="",
        help="N,N,...: time near-duplicate clustering alone on N near copies of one template (no stage run)",
    )
    args = p.parse_args(argv)
    if args.near_copies:
        counts = [int(x) for x in args.near_copies.split(",")]
        load_before = os.getloadavg()
        figures = near_copies(counts)
        figures["load_average_before_after"] = [round(load_before[0], 2), round(os.getloadavg()[0], 2)]
        path = write_result(
            "data_curation_near_copies", {"near_copies": counts, "cores": len(os.sched_getaffinity(0))}, figures
        )
        print(json.dumps(figures, indent=1))
        print(f"wrote {path}")
        return
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-curation-") as tmp:
        root = Path(tmp)
        sources = args.sources if args.repeat == 1 else str(repeated_corpus(root / "corpus", args.repeat))
        overrides = [f"data.sources=[{sources}]", f"curate.shards={args.shards}"]
        one, two = local_run(root, 1, overrides), local_run(root, 2, overrides)
        figures = {
            "docs": one["input_docs"],
            "mb": round(one["bytes_in"] / 1e6, 2),
            "per_step_1_worker": per_step(one),
            "stage_1_worker": whole(one, 1),
            "stage_2_workers": whole(two, 2),
            "scaling_efficiency_2_workers": round(one["wall"] / two["wall"] / 2, 3),
        }
        if args.slurm:
            # cpus_per_task = a node's CPUs: one task per node at a time, so 1 node runs the shards one by one
            node = [*overrides, "resources.cpus_per_task=2"]
            one_node = slurm_run(root, "one-node", [*node, "resources.sbatch_extra=[--nodelist=node1]"])
            two_nodes = slurm_run(root, "two-nodes", node)
            figures.update(
                slurm_1_node=one_node,
                slurm_2_nodes=two_nodes,
                slurm_scaling_efficiency=round(one_node["wall_s"] / two_nodes["wall_s"] / 2, 3),
            )
    figures["load_average_before_after"] = [round(load_before[0], 2), round(os.getloadavg()[0], 2)]
    figures["note"] = (
        "shared machine: other agents' jobs ran at the same time (see the load averages); per-step "
        "figures are CPU time, the stage and scaling figures wall time"
    )
    path = write_result(
        "data_curation",
        {"sources": args.sources, "repeat": args.repeat, "shards": args.shards, "cores": len(os.sched_getaffinity(0))},
        figures,
    )
    print(json.dumps(figures, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
