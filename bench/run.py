"""Run every benchmark, print one table, and keep docs/performance.md's table current.

    python -m bench.run                 # the CPU benchmarks
    python -m bench.run checkpoint_io   # just one
    python -m bench.run --docs          # only rewrite every generated doc table (bench/doc_tables.py)

Each benchmark also writes bench/results/<name>-<device>-<date>.json on its own.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from bench.common import newest_result, write_between_markers

BENCH = Path(__file__).resolve().parent
DOC = BENCH.parent / "docs" / "performance.md"
# name -> (module, the figure that is the ratio, its target, what it compares)
BENCHMARKS = {
    "trainer_overhead": (
        "bench.trainer_overhead",
        "ratio",
        ">= 0.97",
        "full trainer vs bare loop on new batches, tokens/s (median of rounds)",
    ),
    "data_loader": ("bench.data_loader", "ratio", ">= 20", "StreamingDataset vs trainer consumption, tokens/s"),
    "checkpoint_io": (
        "bench.checkpoint_io",
        "save_ratio",
        ">= 0.7 (async block < 0.05)",
        "checkpoint save/load vs plain file I/O, GB/s; async save blocking",
    ),
    "generate_kv": (
        "bench.generate_kv",
        "speedup",
        ">= 5 (gqa ratios > 1)",
        "KV-cached vs uncached greedy decoding, s/token; GQA: kv heads read in place vs copied per step",
    ),
    "status_render": ("bench.status_render", "frame_ms", "< 200 ms", "one dashboard frame with 1,000 runs"),
    "packed_attention": (
        "bench.packed_attention",
        "s8192_speedup",
        "> 1, memory ratio > 4 at 8192",
        "SFT packing: flex_attention BlockMask vs dense document mask, one attention layer",
    ),
}


def table() -> str:
    rows = ["| benchmark | what | figure | target | device | date |", "|---|---|---|---|---|---|"]
    for name, (_, key, target, what) in BENCHMARKS.items():
        result = newest_result(name)
        if result is None:
            continue
        figures = result["figures"]
        shown = ", ".join(
            f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
            for k, v in figures.items()
            if k == key or k.endswith("ratio")
        )
        rows.append(f"| {name} | {what} | {shown} | {target} | {result['device']} | {result['date']} |")
    return "\n".join(rows)


def main() -> None:
    if sys.argv[1:] == ["--docs"]:
        from bench.doc_tables import write_all

        for doc in write_all():
            print("wrote", doc.relative_to(BENCH.parent))
        return
    names = sys.argv[1:] or list(BENCHMARKS)
    for name in names:
        module = BENCHMARKS[name][0]
        if not (BENCH / f"{module.split('.')[-1]}.py").exists():
            print(f"[bench] {name}: not present, skipped")
            continue
        print(f"[bench] {name}")
        subprocess.run([sys.executable, "-m", module], check=True)
    text = table()
    print("\n" + text)
    write_between_markers(DOC, "table", text)


if __name__ == "__main__":
    main()
