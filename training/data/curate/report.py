"""What the data job tells: stats.json (the numbers), report.md (the funnel as a table and a plot, then what each
step removed, with a few examples) and funnel.png, from the tasks' done markers."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from training.data.curate.publish import write_json

STATS = "stats.json"
REPORT = "report.md"
PLOT = "funnel.png"
STEPS = ("read", "exact_dedup", "near_dedup", "filters", "pii", "decontamination")
SWITCH = {"exact_dedup": "exact_dedup", "near_dedup": "near_dedup", "pii": "pii", "decontamination": "decontamination"}


def _sum(dicts) -> dict:
    total: Counter = Counter()
    for d in dicts:
        total.update(d)
    return dict(sorted(total.items()))


def collect(cfg, plan: dict, analyzed: list[dict], deduped: dict, written: list[dict]) -> dict:
    funnel = [
        {
            "step": "input",
            "docs": sum(a["train_records"] for a in analyzed),
            "bytes": sum(a["train_bytes"] for a in analyzed),
        }
    ]
    for step in STEPS:
        docs = sum(w["funnel"].get(step, (0, 0))[0] for w in written)
        nbytes = sum(w["funnel"].get(step, (0, 0))[1] for w in written)
        funnel.append({"step": step, "docs": docs, "bytes": nbytes})
    tasks = [*analyzed, deduped, *written]
    seconds = _sum(t.get("seconds", {}) for t in tasks)
    handled: dict[str, list[int]] = {}
    for t in tasks:
        for step, (docs, nbytes) in t.get("handled", {}).items():
            handled[step] = [handled.get(step, [0, 0])[0] + docs, handled.get(step, [0, 0])[1] + nbytes]
    unreadable = _sum(a["unreadable"] for a in analyzed)
    decontaminated = _sum(w["decontaminated"] for w in written)
    return {
        "input_docs": funnel[0]["docs"],
        "output_docs": funnel[-1]["docs"],
        "bytes_in": funnel[0]["bytes"],
        "bytes_out": funnel[-1]["bytes"],
        "unreadable": sum(unreadable.values()),
        "unreadable_by_kind": unreadable,
        "exact_duplicates": deduped["exact_duplicates"],
        "near_duplicates": deduped["near_duplicates"],
        "filtered": _sum(w["filtered"] for w in written),
        "pii_redactions": _sum(w["pii_redactions"] for w in written),
        "decontaminated": sum(decontaminated.values()),
        "decontaminated_by_reference": decontaminated,
        "heldout_docs": sum(a["val_docs"] for a in analyzed),
        "heldout_bytes": sum(a["val_bytes"] for a in analyzed),
        "funnel": funnel,
        "shards": len(plan["shards"]),
        "cpu_seconds": {k: round(v, 3) for k, v in seconds.items()},  # summed over tasks, per step
        "handled": dict(sorted(handled.items())),  # step -> [documents, bytes] it processed (its CPU seconds' work)
    }


def write_report(run_dir: Path, cfg, plan: dict, analyzed: list[dict], deduped: dict, written: list[dict]) -> dict:
    stats = collect(cfg, plan, analyzed, deduped, written)
    examples: dict[str, list] = {}
    for w in written:
        for key, shown in w["examples"].items():
            examples.setdefault(key, []).extend(shown)
    _plot(stats["funnel"], run_dir / PLOT)
    (run_dir / REPORT).write_text(_markdown(cfg, stats, examples, run_dir))
    write_json(run_dir / STATS, stats)
    return stats


def _plot(funnel: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [row["step"] for row in funnel]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, key, label in ((axes[0], "docs", "documents left"), (axes[1], "bytes", "MB left")):
        values = [row[key] / (1e6 if key == "bytes" else 1) for row in funnel]
        ax.bar(range(len(values)), values, color="#4c78a8")
        ax.set_xticks(range(len(values)), names, rotation=30, ha="right")
        ax.set_title(label)
        for i, v in enumerate(values):
            ax.text(i, v, f"{v:,.0f}" if key == "docs" else f"{v:.2f}", ha="center", va="bottom", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _enabled(cfg, step: str) -> bool:
    if step == "filters":
        return any(f.enabled for f in cfg.curate.filters.values())
    return step not in SWITCH or cfg.curate[SWITCH[step]].enabled


def _markdown(cfg, stats: dict, examples: dict, run_dir: Path) -> str:
    mb = lambda b: f"{b / 1e6:,.2f}"  # noqa: E731
    out = [
        f"# Data curation: {cfg.name}",
        "",
        f"{stats['input_docs']:,} training documents ({mb(stats['bytes_in'])} MB) in, {stats['output_docs']:,} "
        f"({mb(stats['bytes_out'])} MB) out, in `{run_dir.name}/corpus/train/`; {stats['heldout_docs']:,} held-out "
        f"documents ({mb(stats['heldout_bytes'])} MB) passed through untouched to `corpus/val/`.",
        "",
        "## Funnel",
        "",
        "| step | documents | MB | removed here |",
        "|---|---:|---:|---:|",
    ]
    previous = None
    for row in stats["funnel"]:
        removed = "" if previous is None else f"{previous - row['docs']:,}"
        off = "" if row["step"] == "input" or _enabled(cfg, row["step"]) else " (off)"
        out.append(f"| {row['step']}{off} | {row['docs']:,} | {mb(row['bytes'])} | {removed} |")
        previous = row["docs"]
    out += [
        "",
        f"![funnel]({PLOT})",
        "",
        "## What was removed",
        "",
        f"- unreadable: {stats['unreadable']:,} {json.dumps(stats['unreadable_by_kind'])}",
        f"- exact duplicates: {stats['exact_duplicates']:,}",
        f"- near duplicates: {stats['near_duplicates']:,} (Jaccard >= {cfg.curate.near_dedup.threshold}, "
        f"{cfg.curate.near_dedup.num_perm} permutations in {cfg.curate.near_dedup.bands} bands)",
        f"- filtered: {json.dumps(stats['filtered'])}",
        f"- decontaminated: {stats['decontaminated']:,} {json.dumps(stats['decontaminated_by_reference'])}",
        f"- PII redactions (documents kept, placeholders in the text): {json.dumps(stats['pii_redactions'])}",
        "",
        "Every removed document is a line of `removed.jsonl` (its source, record index, reason and, for a "
        "duplicate, the document kept).",
        "",
    ]
    if examples:
        out += ["## Examples", ""]
        for key in sorted(examples):
            out += [f"### {key}", ""]
            for ex in examples[key]:
                where = ex["source"] + (f" record {ex['index']}" if ex.get("index") is not None else "")
                detail = (
                    ex.get("detail")
                    or ex.get("reference")
                    or (f"copy of {ex['kept']['source']}" if ex.get("kept") else "")
                )
                excerpt = ex["excerpt"].replace("```", "'''")
                out += [f"- `{where}`: {detail}", "", "```", excerpt[:300], "```", ""]
    seconds = stats["cpu_seconds"]
    out += [
        "## Time",
        "",
        "CPU seconds per step, summed over tasks: " + ", ".join(f"{k} {v:.2f}" for k, v in seconds.items()),
        "",
    ]
    return "\n".join(out)
