"""Rich renderables from a Frame (collect.py): the cluster panel, pipeline trees, the jobs table, a log tail.

Everything is sized to the console: the jobs table keeps the columns that fit its width, most useful
first, and the panels share the height when one is given (the live view), so 80 columns and a small
SSH window still show the facts that matter. No colour is needed to read it: states are words.
"""

from __future__ import annotations

import time
from typing import Optional

from rich import box
from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from orchestrator.status.collect import Frame, JobRow

BLOCKS = "▁▂▃▄▅▆▇█"
STATE_STYLE = {
    "RUNNING": "bold green",
    "PENDING": "yellow",
    "COMPLETED": "cyan",
    "FAILED": "bold red",
    "CANCELLED": "magenta",
    "CANCELLING": "magenta",
    "LOST": "bold red",
    "TIMEOUT": "red",
    "PREEMPTED": "yellow",
    "REQUEUED": "yellow",
    "IDLE": "green",
    "MIXED": "yellow",
    "ALLOCATED": "bold yellow",
    "DOWN": "bold red",
}


# ---------------------------------------------------------------- small formatters


def sparkline(values: list[float], width: int = 12) -> str:
    values = values[-width:]
    if not values:
        return ""
    lo, hi = min(values), max(values)
    if hi - lo < 1e-12:
        return BLOCKS[3] * len(values)
    return "".join(BLOCKS[round((v - lo) / (hi - lo) * (len(BLOCKS) - 1))] for v in values)


def duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    if h >= 24:
        return f"{h // 24}d{h % 24:02d}h"
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def si(value: Optional[float]) -> str:
    if value is None:
        return "-"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.1f}{unit}"
    return f"{value:.0f}"


def number(value: Optional[float], fmt: str = ".3f") -> str:
    return "-" if value is None else format(value, fmt)


def steps(job: JobRow) -> str:
    if job.step is None:
        return "-" if job.max_steps is None else f"-/{job.max_steps}"
    return f"{job.step}/{job.max_steps}" if job.max_steps else str(job.step)


def checkpoint(job: JobRow) -> str:
    name = job.last_checkpoint
    if not name:
        return "-"
    step = name.split("_", 1)[-1].lstrip("0")
    return step or "0"


def goodput_cell(job: JobRow) -> str:
    share = (job.goodput or {}).get("goodput")
    return "-" if share is None else f"{100 * share:.0f}%"


def state_text(state: str) -> Text:
    return Text(state, style=STATE_STYLE.get(state.rstrip("*~#!%$@^-+"), ""))


# ---------------------------------------------------------------- the cluster


def cluster_panel(frame: Frame, max_nodes: Optional[int] = None) -> Panel:
    c = frame.cluster
    title = Text(c.message, style="bold")
    if not c.nodes:  # the sentence saying why goes in the body, where it wraps rather than being cut
        load = "-" if c.host_load is None else f"{c.host_load:.2f}"
        body = Text.assemble((c.message, "bold yellow"), f"\nthis machine: {c.host_cpus} CPUs, load {load} (1 min)")
        return Panel(body, title=f"Slurm {c.slurm}", title_align="left", box=box.ROUNDED)
    table = Table("node", "state", "CPUs", "GPUs", "load", "partition", box=None, pad_edge=False, expand=False)
    shown = c.nodes if max_nodes is None else c.nodes[:max_nodes]
    for n in shown:
        gpus = f"{n.gpus_alloc}/{n.gpus_total}" if n.gpus_total else "-"
        load = "-" if n.load is None else f"{n.load:.2f}"
        table.add_row(
            n.name,
            state_text(n.state),
            f"{n.cpus_alloc}/{n.cpus_total}",
            gpus,
            load,
            Text(n.partitions + (f"  {n.reason}" if n.reason else ""), overflow="ellipsis", no_wrap=True),
        )
    parts: list[RenderableType] = [table]
    if len(shown) < len(c.nodes):
        parts.append(Text(f"... {len(c.nodes) - len(shown)} more nodes", style="dim"))
    return Panel(Group(*parts), title=title, title_align="left", box=box.ROUNDED)


# ---------------------------------------------------------------- pipelines


def collapsed(frame: Frame, p) -> bool:
    """A sweep is one row unless the view is narrowed to it (`orch status SWEEP`)."""
    return p.sweep and frame.target is None


def pipeline_tree(p, expand: bool = True) -> Tree:
    """A pipeline's stages as a tree; a sweep's root counts its members by state, and without `expand` is all."""
    if p.sweep:
        counts = ", ".join(f"{n} {what}" for what, n in p.counts.items() if n)
        root = Tree(Text.assemble(("sweep ", "dim"), (p.pipeline_id, "bold"), f"  {len(p.stages)} members: {counts}"))
        if not expand:
            return root
    else:
        done = sum(s["state"] == "COMPLETED" for s in p.stages)
        root = Tree(
            Text.assemble(("pipeline ", "dim"), (p.pipeline_id, "bold"), f"  {done}/{len(p.stages)} stages done")
        )
    nodes: dict[str, Tree] = {}
    for s in p.stages:
        label = Text.assemble((s["stage"], "bold"), " ", state_text(s["state"]), "  ", (s["run_id"], "dim"))
        if s["step"] is not None:
            label.append(f"  step {s['step']}" + (f"/{s['max_steps']}" if s["max_steps"] else ""))
        if s.get("reason") and s["state"] != "RUNNING":  # why it waits or how it ended
            label.append(f"  {s['reason']}", style="dim")
        parent = nodes.get(s["depends_on"], root)
        nodes[s["run_id"]] = parent.add(label)
    return root


def pipelines_panel(frame: Frame, max_lines: Optional[int] = None) -> Optional[Panel]:
    if not frame.pipelines:
        return None
    trees, used = [], 0
    for p in frame.pipelines:
        lines = 1 if collapsed(frame, p) else len(p.stages) + 1
        if max_lines is not None and trees and used + lines > max_lines:
            break
        trees.append(pipeline_tree(p, expand=not collapsed(frame, p)))
        used += lines
    rest = len(frame.pipelines) - len(trees)
    if rest:
        trees.append(Text(f"... {rest} more pipelines (orch status PIPELINE_ID)", style="dim"))
    return Panel(Group(*trees), title="pipelines", title_align="left", box=box.ROUNDED)


# ---------------------------------------------------------------- jobs


def loss_cell(job: JobRow, points: int) -> Text:
    """The newest training loss and, after it, a sparkline of the last `points` logged losses."""
    if job.loss is None:
        return Text("-")
    return Text.assemble(f"{job.loss:.3f} ", (sparkline(job.losses, points), "cyan"))


def columns_for(width: int) -> list[tuple]:
    """(header, priority: lower is kept longer, cells it needs, justify, cell) for every column."""
    points = 6 if width < 120 else 16  # the loss sparkline grows on a wide screen
    return [
        ("run", 0, 16, "left", lambda j: Text(j.run_id, overflow="ellipsis", no_wrap=True)),
        ("state", 0, 9, "left", lambda j: state_text(j.state)),
        ("step", 0, 9, "right", steps),
        ("loss", 1, 7 + points, "left", lambda j: loss_cell(j, points)),
        ("tok/s", 2, 6, "right", lambda j: si(j.tokens_per_s)),
        ("ETA", 2, 6, "right", lambda j: duration(j.eta_s) if j.eta_s is not None else "-"),
        ("stage", 5, 7, "left", lambda j: Text(j.stage or "-", overflow="ellipsis", no_wrap=True)),
        ("exec", 6, 5, "left", lambda j: j.executor),
        ("slurm", 3, 6, "right", lambda j: j.slurm_job_id or "-"),
        ("nodes", 5, 8, "left", lambda j: Text(j.nodes, overflow="ellipsis", no_wrap=True)),
        ("MFU", 6, 5, "right", lambda j: "-" if j.mfu is None else f"{100 * j.mfu:.1f}%"),
        ("ckpt", 4, 6, "right", checkpoint),
        ("att", 7, 3, "right", lambda j: str(j.attempts)),
        ("good", 6, 4, "right", goodput_cell),  # productive share of the wall time (goodput.json)
        ("skip", 6, 4, "right", lambda j: str(j.skipped_steps) if j.skipped_steps else "-"),  # NaN/inf steps
    ]


def fitting_columns(width: int) -> tuple[list[tuple], int]:
    """The columns, most useful first, that fit `width` (each also costs 2 cells of padding), and the
    cells left over (the run column may use them for long ids)."""
    columns = columns_for(width)
    chosen, used = [], 0
    for col in sorted(columns, key=lambda c: c[1]):
        if used + col[2] + 2 <= width:
            chosen.append(col)
            used += col[2] + 2
    return [c for c in columns if c in chosen], width - used  # back in reading order


def jobs_table(frame: Frame, width: int, max_rows: Optional[int] = None) -> RenderableType:
    sweeps = {p.pipeline_id for p in frame.pipelines if collapsed(frame, p)}
    jobs = [j for j in frame.jobs if j.pipeline_id not in sweeps]  # a sweep's members: its one row above
    running = sum(j.state == "RUNNING" for j in jobs)
    pending = sum(j.state == "PENDING" for j in jobs)
    title = f"jobs: {len(jobs)} ({running} running, {pending} pending)"
    if not jobs and frame.jobs:
        return Text(title + f" outside sweeps ({len(frame.jobs)} members: orch status SWEEP_ID)", style="dim")
    if not jobs:
        return Text(title + " - nothing submitted yet (orch submit jobs/pretrain.yaml)", style="dim")
    columns, spare = fitting_columns(width)
    table = Table(
        title=title,
        title_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        padding=(0, 1),
        expand=False,
        show_edge=False,
    )
    for header, _, need, justify, _ in columns:
        widest = need + min(spare, 22) if header == "run" else need  # long run ids take the spare cells
        table.add_column(
            header,
            justify=justify,
            no_wrap=True,
            min_width=min(need, len(header)),
            max_width=widest if header in ("run", "nodes", "stage") else None,
            overflow="ellipsis",
        )
    shown = jobs if max_rows is None else jobs[: max(1, max_rows)]
    for job in shown:
        table.add_row(*[cell(job) for *_, cell in columns])
    if len(shown) == len(jobs):
        return table
    more = Text(f"... {len(jobs) - len(shown)} more runs (orch status RUN_ID, or --json for all)", style="dim")
    return Group(table, more)


# ---------------------------------------------------------------- the log


def log_panel(frame: Frame, max_lines: int = 10) -> Optional[Panel]:
    log = frame.log
    if log is None:
        return None
    which = "running" if log.running else "latest"
    lines = log.lines[-max_lines:] if max_lines > 0 else []
    body = Text("\n".join(lines) if lines else "(no log lines yet)", no_wrap=True, overflow="ellipsis")
    return Panel(
        body,
        title=f"log of {which} run {log.run_id}",
        title_align="left",
        subtitle=Text(log.path, overflow="ellipsis"),
        subtitle_align="left",
        box=box.ROUNDED,
    )


# ---------------------------------------------------------------- the whole frame


def render(
    frame: Frame, width: int, height: Optional[int] = None, max_rows: Optional[int] = None, log_lines: int = 10
) -> RenderableType:
    """One screen. With `height` (the live view), panels share it; without, they take what they need."""
    when = time.strftime("%H:%M:%S", time.localtime(frame.time))
    header = Text.assemble(
        ("orch status", "bold"),
        f"  {when}",
        (f"  narrowed to {frame.target}" if frame.target else "", "dim"),
        ("  (Ctrl-C to quit)" if height else "", "dim"),
    )
    max_nodes = pipeline_lines = None
    if height is not None:
        max_nodes = max(1, min(len(frame.cluster.nodes), height // 6))
        pipeline_lines = max(2, height // 5)
    parts: list[RenderableType] = [header, cluster_panel(frame, max_nodes)]
    pipes = pipelines_panel(frame, pipeline_lines)
    if height is not None:  # share the screen: jobs first, the log keeps a fifth and takes what is left
        used = 1 + (max_nodes + 3 if frame.cluster.nodes else 5)  # 5: borders, the why (maybe 2 lines), host
        lines = sum(1 if collapsed(frame, p) else len(p.stages) + 1 for p in frame.pipelines)
        used += (min(pipeline_lines, lines) + 3) if pipes else 0
        left = height - used - 4  # 4: the jobs table's title, header, rule and "... more" line
        log_floor = max(3, height // 5) if frame.log else 0
        max_rows = max(3, min(len(frame.jobs), left - (log_floor + 2 if frame.log else 0)))
        log_lines = max(3, left - max_rows - 2)
    log = log_panel(frame, log_lines)
    if pipes:
        parts.append(pipes)
    parts.append(jobs_table(frame, width, max_rows))
    if log:
        parts.append(log)
    return Group(*parts)
