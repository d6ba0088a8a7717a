"""`orch status`: the refresh loop, `--once` and `--json`.

The live view is a full-screen rich.live.Live redrawn about once a second from a fresh Frame. It reads
no keys (Ctrl-C quits), so it works the same over SSH and inside tmux.
"""

from __future__ import annotations

import json
import time
from typing import Optional

from rich.console import Console
from rich.live import Live

from orchestrator.status.collect import Collector
from orchestrator.status.render import render


def print_once(collector: Collector, console: Console, limit: Optional[int]) -> None:
    frame = collector.collect()
    console.print(render(frame, width=console.width, max_rows=limit))


def print_json(collector: Collector) -> None:
    print(json.dumps(collector.collect().to_dict(), indent=1, default=str))


def run_live(collector: Collector, console: Console, interval: float = 1.0) -> None:
    def screen():
        size = console.size
        return render(collector.collect(), width=size.width, height=size.height)

    with Live(screen(), console=console, screen=True, auto_refresh=False, transient=False) as live:
        live.refresh()
        while True:
            time.sleep(interval)  # the refresh cadence: nothing waits on it
            live.update(screen(), refresh=True)


def cmd_status(args) -> int:
    collector = Collector(target=args.target)
    collector.runs()  # a target that matches nothing raises LookupError (with the choices) before any output
    if args.json:
        print_json(collector)
        return 0
    console = Console()
    if args.once or not console.is_terminal:  # a pipe gets one plain frame, never an endless stream
        print_once(collector, console, args.limit)
        return 0
    try:
        run_live(collector, console, interval=args.interval)
    except KeyboardInterrupt:
        pass
    return 0


def add_parser(sub) -> None:
    s = sub.add_parser("status", help="a live dashboard of the cluster, pipelines and jobs")
    s.add_argument("target", nargs="?", help="narrow to one run id or pipeline id (or a prefix of one)")
    s.add_argument("--once", action="store_true", help="print one frame and exit (plain text when piped)")
    s.add_argument("--json", action="store_true", help="print the same facts as JSON and exit")
    s.add_argument("--limit", type=int, default=50, help="--once: at most this many jobs (default 50)")
    s.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes (default 1)")
    s.set_defaults(func=cmd_status)
