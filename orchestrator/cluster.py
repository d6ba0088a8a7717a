"""The local two-node Slurm cluster (slurm/cluster.sh) from Python: for the tests, and `slurm_available` for
`executor: auto`.

Every function runs the script with subprocess; failures raise ClusterError with the script's own
message (which names the log to read). `up` and `down` need root; `status` and `slurm_available` do not.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "slurm" / "cluster.sh"

__all__ = ["ClusterError", "SCRIPT", "cluster_up", "cluster_down", "cluster_status", "slurm_available"]


class ClusterError(RuntimeError):
    """slurm/cluster.sh failed (or could not be run)."""


def _run(args: list[str], *, timeout: float, stream: bool, ok_codes: tuple[int, ...] = (0,)) -> str:
    if not SCRIPT.is_file():
        raise ClusterError(f"{SCRIPT} not found: the local Slurm cluster scripts are missing from this checkout")
    cmd = ["bash", str(SCRIPT), *args]
    try:
        if stream:  # progress goes straight to the terminal
            proc = subprocess.run(cmd, timeout=timeout, text=True, stdout=subprocess.PIPE)
            stderr = ""
        else:
            proc = subprocess.run(cmd, timeout=timeout, text=True, capture_output=True)
            stderr = proc.stderr
    except subprocess.TimeoutExpired as e:
        raise ClusterError(f"`{' '.join(cmd)}` did not finish within {timeout:.0f}s") from e
    except OSError as e:  # no bash
        raise ClusterError(f"could not run `{' '.join(cmd)}`: {e}") from e
    if proc.returncode not in ok_codes:
        tail = "\n".join(stderr.strip().splitlines()[-15:])
        raise ClusterError(f"`{' '.join(cmd)}` failed (exit {proc.returncode})" + (f":\n{tail}" if tail else ""))
    return proc.stdout


def cluster_up(*, timeout: float = 900, stream: bool = False) -> str:
    """Install (first time only), configure and start the cluster; returns once both nodes are idle and
    sacct answers. Idempotent: a running cluster is left as it is. Needs root. Returns the script's stdout
    (`sinfo -N`)."""
    return _run(["up"], timeout=timeout, stream=stream)


def cluster_down(*, timeout: float = 180, stream: bool = False) -> str:
    """Cancel running jobs and stop every daemon `cluster_up` started (state and accounting are kept)."""
    return _run(["down"], timeout=timeout, stream=stream)


def cluster_status(*, timeout: float = 60) -> dict:
    """Daemons and nodes, e.g.::

        {"cluster": "orch", "state_dir": "/var/lib/orch-slurm", "up": True,
         "daemons": {"munge": {"up": True, "pid": 12}, "mariadb": {...}, "slurmdbd": {...},
                     "slurmctld": {...}, "slurmd-node1": {...}, "slurmd-node2": {...}},
         "nodes": {"node1": {"state": "idle", "cpus": 2, "memory_mb": 10847, "partition": "debug"}, ...}}

    "up" is True only when every daemon runs and both nodes are usable. Never raises because the cluster
    is down, only when the script itself cannot run.
    """
    out = _run(["status", "--json"], timeout=timeout, stream=False, ok_codes=(0, 3))
    try:
        return json.loads(out)
    except json.JSONDecodeError as e:
        raise ClusterError(f"unexpected output from `cluster.sh status --json`: {out!r}") from e


def slurm_available(timeout: float = 10) -> bool:
    """True when `sbatch` is on PATH and slurmctld answers `scontrol ping`."""
    if shutil.which("sbatch") is None or shutil.which("scontrol") is None:
        return False
    try:
        proc = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=timeout)
    except (subprocess.TimeoutExpired, OSError):
        return False
    return proc.returncode == 0 and "is UP" in proc.stdout
