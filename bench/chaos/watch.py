"""What happens while a fault runs, seen from outside: the trainers' log lines as they appear (with the time
they were first seen) and the process table (never two trainers on one run folder).

A Watch polls every quarter of a second in a thread of the benchmark's process; it only reads.
"""

from __future__ import annotations

import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from bench.chaos.workspace import Workspace
from jobspec.processes import same_process
from jobspec.run_lock import holder

EVENTS = {
    "fault": re.compile(r"^\[orch fault\] (\S+)", re.MULTILINE),
    "resumed": re.compile(r"resumed from \S+ at step (\d+)"),
    "started": re.compile(r"^model: ([\d.]+)M parameters", re.MULTILINE),  # printed once resumed or initialized
    "saved": re.compile(r"checkpoint saved: \S*step_(\d+)"),
    "retry": re.compile(r"restarting after exit code|failed \(srun exit code \d+\): requeueing"),
    "requeue": re.compile(r"requeued after a stop signal|stopped by a signal after saving a checkpoint: requeueing"),
}


@dataclass
class Proc:
    pid: int
    cmdline: list[str]
    env: dict

    @property
    def text(self) -> str:
        return " ".join(self.cmdline)


def _read(path: str) -> Optional[bytes]:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def processes_of(ws: Workspace) -> list[Proc]:
    """Live (not zombie) processes that belong to this fault: started with its ORCH_HOME, or naming its folder."""
    home, root = f"ORCH_HOME={ws.home}".encode(), str(ws.root).encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == _SELF:
            continue
        cmdline, stat = _read(f"/proc/{entry.name}/cmdline"), _read(f"/proc/{entry.name}/stat")
        if not cmdline or not stat or stat[stat.rindex(b")") + 2 :][:1] == b"Z":
            continue
        environ = _read(f"/proc/{entry.name}/environ") or b""
        if home not in environ.split(b"\0") and root not in cmdline:
            continue
        env = dict(kv.split("=", 1) for kv in environ.decode(errors="replace").split("\0") if "=" in kv)
        found.append(Proc(int(entry.name), cmdline.decode(errors="replace").split("\0")[:-1], env))
    return found


_SELF = os.getpid()  # the benchmark itself shares the fault's environment variables


def trainer_folder(proc: Proc) -> Optional[tuple[str, int]]:
    """(run folder, rank) of a trainer process (torchrun's workers, a lone trainer, a Slurm task); else None."""
    args = proc.cmdline
    if not args or not Path(args[0]).name.startswith("python") or "-m" not in args:  # srun, bash: launchers
        return None
    module = args[args.index("-m") + 1] if args.index("-m") + 1 < len(args) else ""
    if module == "training.main" and "--run-dir" in args:
        return args[args.index("--run-dir") + 1], int(proc.env.get("RANK", "0"))
    if module == "submitit.core._submit":
        return str(Path(args[-1]).parent), int(proc.env.get("SLURM_PROCID", "0"))
    return None


@dataclass
class Watch:
    ws: Workspace
    events: list = field(default_factory=list)  # (seconds since start, event, value, run id)
    two_trainers: list = field(default_factory=list)  # (seconds, run folder, pids) each time it was seen
    wrong_holder: list = field(default_factory=list)  # (seconds, run folder, lock holder, trainers): not the trainer

    def __post_init__(self):
        self.started = time.monotonic()
        self._seen: dict[tuple, int] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()  # the harness ticks too, when it waits for an event
        self._thread = threading.Thread(target=self._loop, daemon=True, name="chaos-watch")

    def __enter__(self) -> "Watch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.tick()  # the last lines

    def _loop(self) -> None:
        while not self._stop.wait(0.25):
            self.tick()

    def tick(self) -> None:
        with self._lock:
            self._tick()

    def _tick(self) -> None:
        now = time.monotonic() - self.started
        for run in self.ws.registry.list():
            text = self.ws.log_text(run)
            new = []  # in the order the log has them: a restart's "resumed from" comes before its training
            for name, pattern in EVENTS.items():
                hits = [(m.start(), m.group(1) if pattern.groups else m.group(0)) for m in pattern.finditer(text)]
                new += [(pos, name, value) for pos, value in hits[self._seen.get((run.id, name), 0) :]]
                self._seen[(run.id, name)] = len(hits)
            for _, name, value in sorted(new):
                self.events.append((now, name, value, run.id))
        rank0: dict[str, list[int]] = {}
        for proc in processes_of(self.ws):
            where = trainer_folder(proc)
            if where and where[1] == 0:
                rank0.setdefault(str(Path(where[0]).resolve()), []).append(proc.pid)
        for folder, pids in rank0.items():
            trainers = [pid for pid in pids if _parent(pid) not in pids]  # a trainer's forked helpers are not another
            if len(trainers) > 1:  # with what tells a real second trainer from one starting or ending
                self.two_trainers.append((now, folder, [_describe(pid, folder) for pid in trainers]))
            held = holder(folder)  # the lock file must name the trainer that runs, when one holds it
            if held and held.get("pid") not in pids and same_process(held.get("pid"), held.get("pid_start")):
                self.wrong_holder.append((now, folder, held.get("pid"), trainers))

    def first(self, name: str, after: float = 0.0, run_id: Optional[str] = None) -> Optional[tuple]:
        return next(
            (e for e in self.events if e[1] == name and e[0] >= after and (run_id is None or e[3] == run_id)), None
        )

    def wait(self, name: str, run_id: Optional[str] = None, after: float = 0.0, timeout: float = 300) -> float:
        """Seconds (on this watch) at which `name` was first seen in a log after `after`, waiting for it."""
        from bench.chaos.workspace import wait_for

        def seen():
            self.tick()
            return self.first(name, after, run_id)

        return wait_for(seen, f"{name!r} in the logs", timeout)[0]

    def values(self, name: str, run_id: Optional[str] = None) -> list[str]:
        return [e[2] for e in self.events if e[1] == name and (run_id is None or e[3] == run_id)]


def _describe(pid: int, folder: str) -> dict:
    """A trainer process as seen now: its parent, when it started (clock ticks since boot), its state, and
    whether it holds the run folder's lock."""
    stat = _read(f"/proc/{pid}/stat")
    fields = stat[stat.rindex(b")") + 2 :].split() if stat else []
    held = holder(folder) or {}
    return {
        "pid": pid,
        "ppid": int(fields[1]) if fields else None,
        "start": int(fields[19]) if fields else None,
        "state": fields[0].decode() if fields else None,
        "holds_lock": held.get("pid") == pid,
    }


def _parent(pid: int) -> Optional[int]:
    stat = _read(f"/proc/{pid}/stat")
    return int(stat[stat.rindex(b")") + 2 :].split()[1]) if stat else None
