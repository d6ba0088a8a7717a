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
        "| eval | function bodies that parse: "
        + ", ".join(ev)
        + " | "
        + ", ".join(f"{v:.3f}{flag[s]}" for s, v in ev.items())
        + " |",
    ]
    if f["eval_collapsed"]:
        rows += ["", "\\* flagged by the eval report as collapsed (short or near-identical bodies), so not progress."]
    return "\n".join(rows)


def near_copies_table() -> str:
    """docs/data.md's table: near-duplicate clustering on N near copies of one template
    (bench/results/data_curation_near_copies-*.json)."""
    r = newest_result("data_curation_near_copies")
    f, counts = r["figures"], ",".join(map(str, r["config"]["near_copies"]))
    before, after = f["load_average_before_after"]
    rows = [
        (
            f"`python -m bench.data_curation --near-copies {counts}` on {r['device']}, {r['date']} (CPU seconds of "
            f"the clustering alone; load average {before} before, {after} after; template "
            f"`{f['template']}`, {f['edit_share']:.0%} of its lines rewritten in each copy):"
        ),
        "",
        "| near copies | CPU s | µs per copy | per copy, vs the first row | kept | comparing every pair: CPU s, kept |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for x in f["runs"]:
        every_pair = (
            f"{x['all_pairs_cpu_s']:.3f} ({x['speedup']:.0f}x), {x['all_pairs_kept']:,}"
            if "all_pairs_cpu_s" in x
            else "not run (quadratic)"
        )
        rows.append(
            f"| {x['copies']:,} | {x['cpu_s']:.3f} | {x['us_per_copy']:.1f} | "
            f"{x.get('per_copy_vs_first', 1.0):.2f} | {x['kept']:,} | {every_pair} |"
        )
    return "\n".join(rows)


def performance_table() -> str:
    from bench.run import table

    return table()


def chaos_table() -> str:
    from bench.chaos.report import table

    return table(newest_result("chaos"))


def recipe_table() -> str:
    """docs/recipe.md's table: the rows of the full-budget results, best first."""
    from bench.recipe import ROWS, table

    rows = dict(sorted(newest_result("recipe")["figures"].items(), key=lambda kv: kv[1]["val_bpb"]))
    return table(rows, {name: ROWS[name][0] for name in rows if name in ROWS})


def serve_table() -> str:
    from bench.serve import table

    return table()


def scaling_coverage_table() -> str:
    from bench.scaling_fit import coverage_table

    return coverage_table()


def scaling_bias_table() -> str:
    from bench.scaling_fit import bias_table

    return bias_table()


def plan_table() -> str:
    """docs/performance.md's `orch plan` table over the named sizes (bench/results/plan-*.json)."""
    from bench.plan_table import table

    return table()


# (doc, marker, the function that writes what stands between the markers)
TABLES: list[tuple[Path, str, Callable[[], str]]] = [
    (REPO / "README.md", "demo", demo_table),
    (REPO / "docs" / "performance.md", "table", performance_table),
    (REPO / "docs" / "performance.md", "plan_table", plan_table),
    (REPO / "docs" / "data.md", "near_copies", near_copies_table),
    (REPO / "docs" / "reliability.md", "chaos", chaos_table),
    (REPO / "docs" / "recipe.md", "table", recipe_table),
    (REPO / "docs" / "serving.md", "serve", serve_table),
    (REPO / "docs" / "scaling.md", "scaling_fit", scaling_coverage_table),
    (REPO / "docs" / "scaling.md", "approach2_bias", scaling_bias_table),
]


def current(doc: Path, marker: str) -> str:
    """What stands between the doc's markers now."""
    _, rest = doc.read_text().split(f"<!-- {marker} -->\n", 1)
    return rest.split(f"\n<!-- /{marker} -->", 1)[0]


def write_all() -> list[Path]:
    for doc, marker, make in TABLES:
        write_between_markers(doc, marker, make())
    return sorted({doc for doc, _, _ in TABLES})
