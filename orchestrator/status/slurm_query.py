"""The dashboard's view of the cluster: one `scontrol show node -o` per refresh (every node on one line).

The jobs' states are the Slurm executor's one `sacct` call for every job (executors/slurm.py, observe). Nothing
here raises: a missing or silent Slurm comes back as a sentence for the dashboard to show.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass, field
from typing import Optional

TIMEOUT_S = 5.0
_PAIR = re.compile(r"(\w+)=(\S*)")


@dataclass
class NodeFacts:
    name: str
    state: str  # IDLE, MIXED, ALLOCATED, DOWN*, DRAINED, ...
    cpus_alloc: int
    cpus_total: int
    gpus_alloc: int
    gpus_total: int
    load: Optional[float]
    partitions: str
    reason: str = ""


@dataclass
class ClusterFacts:
    slurm: str  # "up", "down" or "absent"
    message: str  # one sentence for the panel's title line
    nodes: list[NodeFacts] = field(default_factory=list)
    # "this machine" when there is no Slurm to show
    host_cpus: Optional[int] = None
    host_load: Optional[float] = None


def _gpus(tres: str) -> int:
    """'cpu=2,mem=10G,gres/gpu=4' -> 4 (also gres/gpu:h100=4)."""
    total = 0
    for item in tres.split(","):
        key, _, value = item.partition("=")
        if key.startswith("gres/gpu"):
            try:
                total += int(value)
            except ValueError:
                pass
    return total


def _int(value: str, default: int = 0) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def parse_nodes(text: str) -> list[NodeFacts]:
    nodes = []
    for line in text.splitlines():
        pairs = dict(_PAIR.findall(line))
        if "NodeName" not in pairs:
            continue
        try:
            load = float(pairs.get("CPULoad", ""))
        except ValueError:
            load = None
        reason = line.split(" Reason=", 1)[1].strip() if " Reason=" in line else ""
        nodes.append(
            NodeFacts(
                name=pairs["NodeName"],
                state=pairs.get("State", "?"),
                cpus_alloc=_int(pairs.get("CPUAlloc")),
                cpus_total=_int(pairs.get("CPUTot")),
                gpus_alloc=_gpus(pairs.get("AllocTRES", "")),
                gpus_total=_gpus(pairs.get("CfgTRES", "")),
                load=load,
                partitions=pairs.get("Partitions", ""),
                reason=reason,
            )
        )
    return nodes


def this_machine(slurm: str, message: str) -> ClusterFacts:
    import os

    try:
        load = round(os.getloadavg()[0], 2)
    except OSError:
        load = None
    return ClusterFacts(slurm=slurm, message=message, host_cpus=os.cpu_count(), host_load=load)


def cluster_nodes() -> ClusterFacts:
    """One `scontrol show node -o`: the nodes, or this machine with why Slurm isn't shown."""
    if shutil.which("scontrol") is None:
        return this_machine("absent", "Slurm not found (no scontrol/sinfo on PATH): showing this machine")
    try:
        proc = subprocess.run(["scontrol", "show", "node", "-o"], capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return this_machine(
            "down",
            f"Slurm is down or not answering (scontrol gave no answer in {TIMEOUT_S:.0f}s): showing this machine",
        )
    except OSError as e:
        return this_machine("down", f"Slurm is down: scontrol could not run ({e}): showing this machine")
    nodes = parse_nodes(proc.stdout)
    if proc.returncode != 0 or not nodes:
        why = (proc.stderr.strip().splitlines() or ["no nodes"])[-1]
        return this_machine("down", f"Slurm is down: {why[:120]}")
    busy = sum(n.cpus_alloc for n in nodes)
    total = sum(n.cpus_total for n in nodes)
    return ClusterFacts(slurm="up", message=f"Slurm up: {len(nodes)} nodes, {busy}/{total} CPUs allocated", nodes=nodes)
