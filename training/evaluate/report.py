"""report.md: every stage of a pipeline (pretrain, SFT, DPO, GRPO, ...) side by side on every metric,
with PNG plots: one bar chart per metric, and each stage's training curves from its metrics.jsonl.

    write_report(run_dir, results)      # results = the eval job's eval.json content
    python -m training.evaluate.report RUN_DIR    # again, from a finished eval run's eval.json
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

# Shown first, in this order; any other metric follows in eval.json's order.
HEADLINE = ("perplexity", "bpb", "acc", "acc_norm", "parses", "passes")
LOWER_IS_BETTER = ("perplexity", "bpb", "loss")
RATES = ("acc", "acc_norm", "parses", "passes")  # fractions: drawn on a 0..1 axis
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


def _plot_metrics(stages: dict, names: list[str], out: Path, plt) -> None:
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    labels = list(stages)
    for ax, name in zip(axes.flat, names):
        values = [stages[s]["metrics"].get(name, float("nan")) for s in labels]
        bars = ax.bar(labels, values, color=[f"C{i}" for i in range(len(labels))])
        ax.bar_label(bars, fmt="%.3g", fontsize=7)
        if name.rsplit("/", 1)[-1] in RATES:
            ax.set_ylim(0, 1.08)
        better = "lower" if name.rsplit("/", 1)[-1] in LOWER_IS_BETTER else "higher"
        ax.set_title(f"{name} ({better} is better)", fontsize=9)
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    for ax in list(axes.flat)[len(names):]:
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


def write_report(run_dir: str | Path, results: dict) -> Path:
    """run_dir/report.md and run_dir/report/*.png from the eval job's results; returns the .md path."""
    run_dir = Path(run_dir)
    stages = results["stages"]
    names = _metric_names(stages)
    curves = {s: read_curves(stages[s].get("run_dir")) for s in stages}
    plots = run_dir / "report"
    plots.mkdir(exist_ok=True)
    lines = [f"# Evaluation: {', '.join(stages)}", "",
             f"Written {time.strftime('%Y-%m-%d %H:%M')} by the eval job in `{run_dir}`; numbers from `eval.json`.", "",
             "## Stages", "", "| stage | checkpoint | examples per task |", "|---|---|---|"]
    for stage, body in stages.items():
        counts = ", ".join(f"{k[:-2]} {v}" for k, v in body["metrics"].items() if k.endswith("/n"))
        lines.append(f"| {stage} | `{body['checkpoint']}` | {counts or '-'} |")
    lines += ["", "## Metrics", "", "| metric | " + " | ".join(stages) + " |", "|---" * (len(stages) + 1) + "|"]
    for name in names:
        lines.append(f"| {name} | " + " | ".join(_fmt(stages[s]["metrics"].get(name)) for s in stages) + " |")
    lines += ["", "Perplexity and bpb (bits per byte): lower is better; acc, acc_norm (multiple choice by "
              "log-likelihood, acc_norm per character of the choice), parses and passes (generated code that parses, "
              "that passes its test): higher is better.", ""]
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        lines += ["(No plots: matplotlib is not installed; `pip install matplotlib`.)", ""]
        plt = None
    if plt is not None and names:
        _plot_metrics(stages, names, plots / "metrics.png", plt)
        lines += ["## Every metric by stage", "", "![metrics by stage](report/metrics.png)", ""]
    if plt is not None and any(curves.values()):
        _plot_curves(stages, curves, plots / "curves.png", plt)
        lines += ["## Training curves (each stage's metrics.jsonl)", "", "![training curves](report/curves.png)", ""]
    missing = [s for s in stages if not curves[s]]
    if missing:
        lines += [f"No training curves for {', '.join(missing)} (no metrics.jsonl: a Hugging Face folder or a "
                  "run that logged nothing).", ""]
    for stage, body in stages.items():
        for task, samples in (body.get("samples") or {}).items():
            if samples:
                lines += [f"### {stage}: a {task} sample", "", "```python", samples[0]["prompt"] + samples[0]["completion"],
                          "```", ""]
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
