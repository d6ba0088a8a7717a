"""How a training process on CPUs uses the machine: its threads, how they wait, how memory is reused.

Three problems, each measured on the demo (docs/performance.md), none specific to one machine:
  * waiting: torch's OpenMP (GNU libgomp) lets a thread with no work spin for GOMP_SPINCOUNT = 300,000
    pause instructions (milliseconds on recent x86) before it sleeps. When other processes use the
    same cores, the spinning threads burn the time their partner thread (and everyone else) needs:
    the demo trainer ran 5x slower beside other jobs on 2 cores. A short spin keeps the quick
    hand-over between consecutive kernels and sleeps when the partner is not coming soon.
  * counting: torch starts one thread per CPU in its affinity mask, which ignores a container's CPU
    quota (cgroup cpu.max) and a Slurm allocation (SLURM_CPUS_PER_TASK) on a node without CPU binding:
    more threads than cores then queue for them.
  * memory: glibc returns freed blocks to the kernel (each over its adaptive mmap threshold, and the
    heap's free top past its trim threshold), so every step maps its activations afresh and pays a
    page fault per 4 KB: a fifth of the demo's CPU time went to the kernel. Fixed thresholds keep
    the blocks of one step for the next.
An explicit OMP_NUM_THREADS, GOMP_SPINCOUNT, OMP_WAIT_POLICY or GLIBC_TUNABLES from the user (or torchrun) wins.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import math
import os
import sys
from pathlib import Path

SPIN_COUNT = "1000"  # libgomp's own choice when it knows it has more threads than CPUs
MMAP_THRESHOLD = 32 << 20  # glibc's largest: blocks up to 32 MB come from the reusable heap
TRIM_THRESHOLD = 1 << 30  # keep up to 1 GB of freed heap for the next step
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)


def set_openmp_wait_policy() -> None:
    """Bound the OpenMP threads' spinning. libgomp reads it when torch loads: call this first."""
    if "torch" in sys.modules:
        return  # too late to matter for this process
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ.setdefault("GOMP_SPINCOUNT", SPIN_COUNT)


def usable_cores() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup quota and by Slurm's allocation."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cores = min(cores, max(1, math.floor(int(quota) / int(period))))
    except (OSError, ValueError):
        pass  # no cgroup v2 quota here
    if os.environ.get("SLURM_CPUS_PER_TASK", "").isdigit():
        cores = min(cores, int(os.environ["SLURM_CPUS_PER_TASK"]))
    return max(1, cores)


def set_cpu_threads() -> int:
    """One compute thread per usable core, unless OMP_NUM_THREADS says otherwise. Returns the count."""
    import torch

    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(usable_cores())
    return torch.get_num_threads()


def keep_freed_memory() -> bool:
    """Fix glibc's mmap and trim thresholds (mallopt), so freed activations are reused, not unmapped.
    Returns whether they were set: not on another C library, nor when GLIBC_TUNABLES already decides."""
    if not sys.platform.startswith("linux") or "GLIBC_TUNABLES" in os.environ:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def set_up_cpu_process() -> None:
    """The thread count and memory reuse of a process that computes on CPUs (called by init_distributed)."""
    set_cpu_threads()
    keep_freed_memory()


def can_compile(device) -> bool:
    """torch.compile's CPU backend writes and builds C++: without a compiler (a fresh machine may lack
    one), say so and train eager rather than fail at the first step."""
    if device.type != "cpu":
        return True
    # Inductor imports torch.utils.cpp_extension, which warns at import that a CPU-only machine has no CUDA.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    from torch._inductor.cpp_builder import get_cpp_compiler
    from torch._inductor.exc import InvalidCxxCompiler

    try:
        get_cpp_compiler()
        return True
    except InvalidCxxCompiler:
        print(
            "note: train.compile needs a C++ compiler on CPUs (Debian: apt-get install g++); training eager",
            file=sys.stderr,
            flush=True,
        )
        return False
