"""The data job (kind: data): curate data.sources into the run folder's corpus/, which a pretrain stage after it
reads (orchestrator/pipeline.py points its data.sources there).

    orch submit jobs/data.yaml                         # every core of this machine
    orch submit jobs/data.yaml executor=slurm          # job arrays over the shards (executors/slurm_array.py)

Writes corpus/train/*.jsonl and corpus/val/*.jsonl, stats.json, removed.jsonl, report.md, funnel.png and, as it
goes, metrics.jsonl records whose step is documents read (orch status shows them like training steps).
Submitting the same run folder again (orch resume) skips every task that finished.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from training.data.curate.local import default_workers, run_stage
from training.data.curate.plan import make_plan
from training.data.curate.report import REPORT


def run_curate(cfg, dist_info, run_dir: Path) -> int:
    if dist_info.world_size > 1:  # the pool is the parallelism; several ranks would each run the whole stage
        raise ValueError(
            f"the data job runs in one process with curate.workers processes, but it was started "
            f"with {dist_info.world_size}: set resources.nproc_per_node=1 and resources.nodes=1"
        )
    start = time.time()
    workers = default_workers(cfg)
    plan = make_plan(cfg, run_dir, workers)
    print(
        f"[curate] {plan['docs']:,} documents ({plan['bytes'] / 1e6:,.1f} MB) in {len(plan['files']):,} files, "
        f"{len(plan['shards'])} shards on {workers} worker processes",
        flush=True,
    )
    stats = run_stage(run_dir, workers)
    if stats.get("analyze_skipped"):
        print(f"[curate] {stats['analyze_skipped']} shards had been analyzed by an earlier attempt: skipped")
    print(
        f"[curate] {stats['input_docs']:,} -> {stats['output_docs']:,} training documents "
        f"({stats['bytes_in'] / 1e6:,.2f} -> {stats['bytes_out'] / 1e6:,.2f} MB): unreadable {stats['unreadable']}, "
        f"exact {stats['exact_duplicates']}, near {stats['near_duplicates']}, "
        f"filtered {json.dumps(stats['filtered'])}, "
        f"decontaminated {stats['decontaminated']}, PII {json.dumps(stats['pii_redactions'])} "
        f"in {time.time() - start:.1f}s; see {Path(run_dir) / REPORT}",
        flush=True,
    )
    return 0
