"""Stopping cleanly on a signal: preemption (SIGUSR2 from Slurm's warning), SIGTERM (scancel, `orch cancel`,
torchrun's shutdown) and Ctrl-C all ask the trainer to save a checkpoint and exit with EXIT_REQUEUE.

The entry point (training/main.py) installs the handlers once per process; a Trainer built anywhere else (a
benchmark, a test) gets a StopFlag nobody sets, and Ctrl-C keeps its usual meaning there. torchrun and Slurm signal
the trainer's whole process group: its data loader workers ignore these signals (training/data/loader.py), so
that none dies before the trainer has saved.
"""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT)


class StopFlag:
    """Set by a stop signal; the trainer checks it between steps."""

    def __init__(self):
        self.signal = None

    def set(self, signum, frame=None) -> None:
        self.signal = signum

    def agreed(self, world_size: int, device) -> bool:
        """All ranks must stop at the same step, or the checkpoint collective would hang."""
        if world_size == 1:
            return self.signal is not None
        flag = torch.tensor([0 if self.signal is None else 1], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def install_stop_handlers() -> StopFlag:
    """A StopFlag that SIGTERM, SIGUSR2 and SIGINT set, for this whole process."""
    flag = StopFlag()
    for sig in STOP_SIGNALS:
        signal.signal(sig, flag.set)
    return flag
