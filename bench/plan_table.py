"""`orch plan` over the named sizes and the layouts a cluster offers: the table of docs/performance.md.

    python -m bench.plan_table            # every row (several minutes on 2 cores), into the doc and bench/results/
    python -m bench.plan_table --rows 2   # the first rows only (a smoke test; writes nothing)

Each row is training/plan's measurement (the job's real mesh, FSDP2, TP and AdamW step, in a fake world of its
size: docs/slurm.md), one sequence of 2,048 tokens per GPU per micro-step, no activation checkpointing, bf16 on
GPUs, so that rows compare with bench/memory_plan.py's arithmetic, printed beside each (its peak for the same
shape; the plan's tensors, before the 2 GiB margin the plan adds for the CUDA context, NCCL and fragmentation).
"Fits" compares the plan's peak, margin included, with an H100's and an H200's memory (training/plan/devices.py).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from omegaconf import OmegaConf

from jobspec import load_spec
from training.plan.devices import DEVICES, GIB
from training.plan.estimate import plan_job

DOC = Path(__file__).resolve().parents[1] / "docs" / "performance.md"
SEQ = 2048
# (size, nodes, GPUs per node, dp_replicate, tp): one GPU, a node, tp 8, HSDP over 2 and 8 nodes, FSDP over 64
ROWS = [
    ("125m", 1, 1, 1, 1),
    ("125m", 1, 8, 1, 1),
    ("350m", 1, 8, 1, 1),
    ("760m", 1, 8, 1, 1),
    ("1.3b", 1, 8, 1, 1),
    ("1.3b", 1, 8, 1, 8),
    ("1.3b", 2, 8, 2, 1),
    ("7b", 1, 8, 1, 1),
    ("7b", 1, 8, 1, 8),
    ("7b", 2, 8, 2, 1),
    ("7b", 8, 8, 8, 1),
    ("7b", 8, 8, 1, 1),
    ("8b", 1, 8, 1, 8),
    ("8b", 2, 8, 2, 1),
    ("8b", 8, 8, 8, 1),
    ("8b", 8, 8, 1, 1),
]


def job(size: str, nodes: int, per_node: int, replicate: int, tp: int):
    path = Path(__file__).resolve().parents[1] / "jobs" / "gpu" / "pretrain-125m.yaml"
    return load_spec(
        str(path),
        [
            f"model.size={size}",
            f"data.seq_len={SEQ}",
            f"model.max_seq_len={max(SEQ, 2048)}",
            "train.micro_batch_size=1",
            "train.grad_accum_steps=1",
            "data.vocab_size=32000",
            f"resources.nodes={nodes}",
            f"resources.nproc_per_node={per_node}",
            f"parallel.dp_replicate={replicate}",
            f"parallel.dp_shard={nodes * per_node // (replicate * tp)}",  # explicit: -1 on nodes > 1 is HSDP
            f"parallel.tp={tp}",
        ],
        launch=True,
    )


def arithmetic_peak(cfg, dp_shard: int, tp: int, world: int) -> float:
    from bench.memory_plan import plan
    from training.plan.measure import model_config

    out = plan(model_config(cfg), SEQ, dp_shard, tp, 1, fsdp=world > tp)
    return out["peak"] if out else float("nan")


HEADER = [
    (
        "| model | parameters | GPUs | layout | peak per GPU | memory_plan.py | fits H100 (79 GiB) | "
        "fits H200 (140 GiB) | collectives a step | roofline step, MFU <= (H100) |"
    ),
    "|---|---|---|---|---|---|---|---|---|---|",
]


def row(record: dict) -> str:
    plan, lay, mem = record["plan"], record["plan"]["layout"], record["plan"]["memory_gib"]
    if lay["world"] == 1:
        layout = "1 GPU"
    else:
        dp = f"HSDP {lay['dp_replicate']} x {lay['dp_shard']}" if lay["dp_replicate"] > 1 else f"FSDP {lay['dp_shard']}"
        layout = f"{lay['nodes']} x {lay['gpus_per_node']}: {dp}" + (f", tp {lay['tp']}" if lay["tp"] > 1 else "")
    arith = record["memory_plan_peak_gib"]
    wire = sum(c["wire_bytes"] for c in plan["collectives"]) / GIB
    yes = {True: "yes", False: "no"}
    return (
        f"| {record['size']} | {plan['job']['params'] / 1e9:.2f}B | {lay['world']} | {layout} | "
        f"{mem['peak']:.1f} GiB ({mem['tensors_peak']:.1f} + {mem['margin']:.0f}) | {arith:.1f} GiB "
        f"({(mem['tensors_peak'] - arith) / arith:+.0%}) | {yes[record['fits']['h100']]} | "
        f"{yes[record['fits']['h200']]} | {wire:.1f} GiB | {plan['roofline']['step_s'] * 1e3:.0f} ms, "
        f"{plan['roofline']['mfu']:.0%} |"
    )


def table(result: dict | None = None) -> str:
    """The doc's table, from the newest bench/results/plan-*.json (bench/doc_tables.py, tests/test_docs.py)."""
    from bench.common import newest_result

    result = result or newest_result("plan")
    return "\n".join([*HEADER, *(row(r) for r in result["figures"]["rows"])])


def main() -> None:
    from bench.common import write_between_markers, write_result
    from training.plan.report import as_dict

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=len(ROWS))
    args = p.parse_args()
    records = []
    for size, nodes, per_node, replicate, tp in ROWS[: args.rows]:
        cfg = job(size, nodes, per_node, replicate, tp)
        start = time.perf_counter()
        plan = plan_job(cfg, nodes * per_node, per_node, DEVICES["h100"], levers=False)
        seconds = time.perf_counter() - start
        records.append(
            {
                "size": size,
                "nodes": nodes,
                "gpus_per_node": per_node,
                "dp_replicate": replicate,
                "tp": tp,
                "plan": as_dict(plan),
                "plan_seconds": seconds,
                "memory_plan_peak_gib": arithmetic_peak(cfg, plan.layout.dp_shard, tp, plan.layout.world) / GIB,
                "fits": {name: plan.peak_bytes <= DEVICES[name].memory_bytes for name in ("h100", "h200")},
            }
        )
        print(row(records[-1]), f"({seconds:.0f} s to plan)", flush=True)
    if args.rows == len(ROWS):
        config = {
            "seq": SEQ,
            "micro_batch": 1,
            "activation_checkpointing": False,
            "optimizer": "adamw",
            "planned_on": "this CPU: fake process group, FakeTensorMode",
            "devices": {k: DEVICES[k].name for k in ("h100", "h200")},
            "job": OmegaConf.to_container(job(*ROWS[0]).train),
        }
        path = write_result("plan", config, {"rows": records})
        write_between_markers(DOC, "plan_table", table())
        print("wrote", path)
    else:
        print("\n".join([*HEADER, *(row(r) for r in records)]))


if __name__ == "__main__":
    main()
