"""report.md: every stage of a pipeline (pretrain, SFT, DPO, GRPO, ...) side by side on every metric,
with PNG plots: one bar chart per metric, and each stage's training curves from its metrics.jsonl.

A stage whose completions on a generation task collapsed (one answer for every prompt, or answers far
shorter than the real ones: training/posttrain/collapse.py) is flagged at the top, its parses and passes
on that task are marked "collapsed" in the table and drawn hatched in grey: hollow, not progress.

    write_report(run_dir, results)      # results = the eval job's eval.json content
    python -m training.evaluate.report RUN_DIR    # again, from a finished eval run's eval.json
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

from jobspec.contract import RunFolder
from training.posttrain.collapse import DISTINCT_MIN, LENGTH_MIN, collapsed_tasks

# Shown first, in this order; any other metric follows in eval.json's order.
HEADLINE = ("perplexity", "bpb", "acc", "acc_norm", "parses", "passes")
LOWER_IS_BETTER = ("perplexity", "bpb", "loss")
RATES = ("acc", "acc_norm", "parses", "passes", "distinct_frac")  # fractions: drawn on a 0..1 axis
HOLLOW_WHEN_COLLAPSED = ("parses", "passes")  # what a collapsed model can score without writing functions
CURVES = ("loss", "val_loss", "reward", "val_reward")


def _metric_names(stages: dict) -> list[str]:
    names: list[str] = []
    for stage in stages.values():
        names += [k for k in stage["metrics"] if k not in names and not k.endswith(("/n", "/tokens"))]
    rank = {m: i for i, m in enumerate(HEADLINE)}
    return sorted(names, key=lambda k: (rank.get(k.rsplit("/", 1)[-1], len(HEADLINE)), names.index(k)))


def read_curves(run_dir: str | None) -> dict[str, list[tuple[int, float]]]:
    """(step, value) series from a run's metrics.jsonl: the training loss, the validation loss, and the
    reward of kinds that log one (other val_* numbers have scales of their own: they are in the table)."""
    curves: dict[str, list[tuple[int, float]]] = {}
    path = Path(run_dir) / "metrics.jsonl" if run_dir else None
    if path is None or not path.is_file():
        return curves
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
        for key, value in record.items():
            if key in CURVES and isinstance(value, (int, float)) and "step" in record:
                curves.setdefault(key, []).append((int(record["step"]), float(value)))
    return curves


def _hollow(collapsed: dict, stage: str, name: str) -> bool:
    """Whether this stage's metric is a parses/passes of a task on which its completions collapsed."""
    task, _, metric = name.rpartition("/")
    return metric in HOLLOW_WHEN_COLLAPSED and task in collapsed.get(stage, {})


def _plot_metrics(stages: dict, names: list[str], out: Path, plt, collapsed: dict) -> None:
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    labels = list(stages)
    for ax, name in zip(axes.flat, names):
        values = [stages[s]["metrics"].get(name, float("nan")) for s in labels]
        hollow = [_hollow(collapsed, s, name) for s in labels]
        bars = ax.bar(labels, values, color=["lightgrey" if h else f"C{i}" for i, h in enumerate(hollow)])
        for bar, h in zip(bars, hollow):
            if h:
                bar.set_hatch("xx")
        ax.bar_label(bars, fmt="%.3g", fontsize=7)
        if name.rsplit("/", 1)[-1] in RATES:
            ax.set_ylim(0, 1.08)
        better = "lower" if name.rsplit("/", 1)[-1] in LOWER_IS_BETTER else "higher"
        ax.set_title(f"{name} ({better} is better)", fontsize=9)
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)


def _plot_curves(stages: dict, curves: dict, out: Path, plt) -> None:
    names = [s for s in stages if curves[s]]
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.2), squeeze=False)
    for ax, stage in zip(axes.flat, names):
        for i, (key, points) in enumerate(sorted(curves[stage].items(), key=lambda kv: kv[0] != "loss")):
            steps, values = zip(*points)
            ax.plot(steps, values, marker="o" if key != "loss" else None, markersize=3, label=key, color=f"C{i}")
        ax.set_title(stage, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _collapse_lines(stages: dict, collapsed: dict) -> list[str]:
    """The warning for each collapsed stage, and every stage's distinct_frac and len_ratio per task."""
    lines = []
    for stage, tasks in collapsed.items():
        for task, reasons in tasks.items():
            lines += [
                f"> **Warning: {stage}'s completions on {task} have collapsed** ({', '.join(reasons)}): one "
                f"short answer for (nearly) every prompt. Its {task} parses and passes are not progress: "
                "read its samples below. A reward that such answers satisfy has been gamed.",
                "",
            ]
    rows = [
        (stage, key.rsplit("/", 1)[0])
        for stage, body in stages.items()
        for key in body["metrics"]
        if key.endswith("/distinct_frac")
    ]
    if rows:
        lines += [
            "## Collapse check",
            "",
            f"Distinct greedy completions over prompts (distinct_frac, under {DISTINCT_MIN} = collapsed) and "
            f"mean completion length over the reference's (len_ratio, under {LENGTH_MIN} = collapsed).",
            "",
            "| stage | task | distinct_frac | len_ratio | verdict |",
            "|---|---|---|---|---|",
        ]
        for stage, task in rows:
            m = stages[stage]["metrics"]
            verdict = "**collapsed**" if task in collapsed.get(stage, {}) else "ok"
            lines.append(
                f"| {stage} | {task} | {_fmt(m.get(task + '/distinct_frac'))} | "
                f"{_fmt(m.get(task + '/len_ratio'))} | {verdict} |"
            )
        lines.append("")
    return lines


def read_goodput(run_dir: str | None) -> dict | None:
    """A stage's goodput.json (training/goodput.py): where its training run's wall time went."""
    try:
        return json.loads(RunFolder(run_dir).goodput.read_text()) if run_dir else None
    except (OSError, ValueError):
        return None  # a Hugging Face folder, or a run from before goodput was recorded


def _goodput_lines(stages: dict) -> list[str]:
    """Each stage's wall time split into productive steps, recomputed (lost) steps, checkpoint stalls, validation,
    restarts and the gaps between attempts; goodput = productive / wall."""
    accounts = {s: read_goodput(body.get("run_dir")) for s, body in stages.items()}
    if not any(accounts.values()):
        return []
    cols = ("productive", "lost", "checkpoint", "validation", "restart", "interrupted", "other")
    lines = [
        "## Goodput (each stage's training run)",
        "",
        "Wall time split by attempt (`goodput.json`); goodput = productive / wall (Meta's effective training time "
        "ratio: recomputed steps and restarts excluded).",
        "",
        "| stage | goodput | wall s | attempts | lost steps | " + " | ".join(f"{c} s" for c in cols) + " |",
        "|---" * (5 + len(cols)) + "|",
    ]
    for stage, account in accounts.items():
        if account:
            b = account["buckets_s"]
            lines.append(
                f"| {stage} | {_fmt(account.get('goodput'))} | {account['wall_s']:.1f} | {account['attempts']} | "
                f"{account.get('lost_steps', 0)} | " + " | ".join(f"{b.get(c, 0.0):.1f}" for c in cols) + " |"
            )
        else:
            lines.append(f"| {stage} | - |" + " - |" * (3 + len(cols)))
    return [*lines, ""]


def write_report(run_dir: str | Path, results: dict) -> Path:
    """run_dir/report.md and run_dir/report/*.png from the eval job's results; returns the .md path."""
    run_dir = Path(run_dir)
    stages = results["stages"]
    names = _metric_names(stages)
    collapsed = {s: tasks for s, body in stages.items() if (tasks := collapsed_tasks(body["metrics"]))}
    curves = {s: read_curves(stages[s].get("run_dir")) for s in stages}
    plots = run_dir / "report"
    plots.mkdir(exist_ok=True)
    lines = [
        f"# Evaluation: {', '.join(stages)}",
        "",
        f"Written {time.strftime('%Y-%m-%d %H:%M')} by the eval job in `{run_dir}`; numbers from `eval.json`.",
        "",
        "## Stages",
        "",
        "| stage | checkpoint | examples per task |",
        "|---|---|---|",
    ]
    for stage, body in stages.items():
        counts = ", ".join(f"{k[:-2]} {v}" for k, v in body["metrics"].items() if k.endswith("/n"))
        lines.append(f"| {stage} | `{body['checkpoint']}` | {counts or '-'} |")
    lines += ["", *_collapse_lines(stages, collapsed)]
    lines += ["## Metrics", "", "| metric | " + " | ".join(stages) + " |", "|---" * (len(stages) + 1) + "|"]
    for name in names:
        cells = [
            _fmt(stages[s]["metrics"].get(name)) + (" (collapsed)" if _hollow(collapsed, s, name) else "")
            for s in stages
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Perplexity and bpb (bits per byte): lower is better; acc, acc_norm (multiple choice by "
        "log-likelihood, acc_norm per character of the choice), parses and passes (generated code that parses, "
        "that passes its test): higher is better.",
        "",
        *_goodput_lines(stages),
    ]
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        lines += ["(No plots: matplotlib is not installed; `pip install matplotlib`.)", ""]
        plt = None
    if plt is not None and names:
        _plot_metrics(stages, names, plots / "metrics.png", plt, collapsed)
        lines += ["## Every metric by stage", "", "![metrics by stage](report/metrics.png)", ""]
    if plt is not None and any(curves.values()):
        _plot_curves(stages, curves, plots / "curves.png", plt)
        lines += ["## Training curves (each stage's metrics.jsonl)", "", "![training curves](report/curves.png)", ""]
    missing = [s for s in stages if not curves[s]]
    if missing:
        lines += [
            f"No training curves for {', '.join(missing)} (no metrics.jsonl: a Hugging Face folder or a "
            "run that logged nothing).",
            "",
        ]
    for stage, body in stages.items():
        for task, samples in (body.get("samples") or {}).items():
            if samples:
                note = " (collapsed)" if task in collapsed.get(stage, {}) else ""
                lines += [
                    f"### {stage}: a {task} sample{note}",
                    "",
                    "```python",
                    samples[0]["prompt"] + samples[0]["completion"],
                    "```",
                    "",
                ]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: python -m training.evaluate.report RUN_DIR  (a finished eval run's folder)")
    run_dir = Path(sys.argv[1])
    print(write_report(run_dir, json.loads((run_dir / "eval.json").read_text())))


if __name__ == "__main__":
    main()
