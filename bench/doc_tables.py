"""Every table in README.md and docs/ that quotes a measurement, written from bench/results/ and nothing else.

    python -m bench.run --docs     # rewrite them all (no benchmark runs)

A doc marks a generated table with `<!-- name -->` ... `<!-- /name -->`; tests/test_docs.py fails when one differs
from what its function here writes, so a number has one home (its results JSON) and the docs cannot drift.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from bench.common import newest_result, write_between_markers

REPO = Path(__file__).resolve().parents[1]


def demo_table() -> str:
    """README's table: what one demo run measured, stage by stage (bench/results/demo-*.json)."""
    r = newest_result("demo")
    f = r["figures"]
    p, sft, dpo, grpo, ev = f["pretrain"], f["sft"], f["dpo"], f["grpo"], f["eval_stdlib_bodies_parses"]
    flag = {s: "\\*" if s in f["eval_collapsed"] else "" for s in ev}
    rows = [
        f"Measured by `{r['command']}` on {r['device']}, {r['date']} (commit {r['commit']}, "
        f"{r['config']['wall_minutes']} minutes in all); earlier runs are in docs/results.md.",
        "",
        "| stage | on held-out data | measured |",
        "| --- | --- | --- |",
        f"| pretrain ({p['params_m']}M parameters, {p['budget_min']} min budget) | bits per byte (`xz -9e` on the "
        f"same text: {p['xz_bpb']:.3f}) | **{p['val_bpb']:.3f}** ({p['steps']:,} steps, "
        f"{p['median_tokens_per_s']:,} tokens/s) |",
        f"| SFT ({sft['steps']} steps) | completion loss, nats per token, first -> last step | "
        f"{sft['val_completion_loss_first']:.3f} -> {sft['val_completion_loss_last']:.3f} |",
        f"| DPO ({dpo['steps']} steps) | preference accuracy at step 100, {dpo['steps']} | "
        f"{dpo['val_accuracy_step100']:.3f}, {dpo['val_accuracy_last']:.3f} |",
        f"| GRPO ({grpo['steps']} steps) | greedy completions that parse and define a function, first -> last step | "
        f"{grpo['val_parses_first']:.3f} -> {grpo['val_parses_last']:.3f} |",
        "| eval | function bodies that parse: " + ", ".join(ev) + " | "
        + ", ".join(f"{v:.3f}{flag[s]}" for s, v in ev.items()) + " |",
    ]
    if f["eval_collapsed"]:
        rows += ["", "\\* flagged by the eval report as collapsed (short or near-identical bodies), so not progress."]
    return "\n".join(rows)


def performance_table() -> str:
    from bench.run import table

    return table()


# (doc, marker, the function that writes what stands between the markers)
TABLES: list[tuple[Path, str, Callable[[], str]]] = [
    (REPO / "README.md", "demo", demo_table),
    (REPO / "docs" / "performance.md", "table", performance_table),
]


def current(doc: Path, marker: str) -> str:
    """What stands between the doc's markers now."""
    _, rest = doc.read_text().split(f"<!-- {marker} -->\n", 1)
    return rest.split(f"\n<!-- /{marker} -->", 1)[0]


def write_all() -> list[Path]:
    for doc, marker, make in TABLES:
        write_between_markers(doc, marker, make())
    return sorted({doc for doc, _, _ in TABLES})
