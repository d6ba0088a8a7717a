"""Uninterrupted reference runs, one per config that changes the numbers (config.math_key), cached on disk.

A reference is the chaos job run straight through with torchrun on 2 ranks, no executor, no fault (or, for a
non-finite loss, the same `train.loss#k:nan` as the run it is compared with). Its cache key is what decides the
bits it ends with: the resolved config (every key of jobs/pretrain.yaml with the chaos job's overrides, less the
policy keys of config.POLICY_PREFIXES), a hash of the code of model/, training/ and jobspec/, the versions of the
libraries that compute (torch, numpy, safetensors, streaming, tokenizers, Python) and the machine (CPU model, the
instruction set torch dispatches to). A cache kept across an upgrade of torch or a move to another machine then
runs its references again instead of comparing with bits another build computed.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

from bench.chaos.config import JOB, REPO, math_key, overrides
from bench.common import device_name, versions


def code_fingerprint() -> str:
    h = hashlib.sha256()
    for package in ("model", "training", "jobspec"):
        for path in sorted((REPO / package).rglob("*.py")):
            h.update(path.read_bytes())
    return h.hexdigest()[:12]


def machine() -> dict:
    import platform

    import numpy
    import torch

    return {
        "cpu": device_name(),
        "arch": platform.machine(),
        "isa": torch.backends.cpu.get_cpu_capability(),
        "numpy": numpy.__version__,
        **versions(),
    }


def resolved(data_dir: Path, extra: tuple[str, ...]) -> dict:
    """The config a run of the chaos job with these overrides trains with, as the trainer loads it."""
    from omegaconf import OmegaConf

    from jobspec.loading import load_spec

    return OmegaConf.to_container(load_spec(str(JOB), overrides(data_dir, *extra)), resolve=True)


class References:
    def __init__(self, root: Path, data_dir: Path):
        self.root, self.data_dir = Path(root) / "references", Path(data_dir)
        self.code = code_fingerprint()
        self.machine = machine()

    def key(self, extra: tuple[str, ...], fault: str) -> str:
        text = json.dumps(
            {
                "config": math_key(resolved(self.data_dir, extra)),
                "fault": fault,
                "code": self.code,
                "machine": self.machine,
            },
            sort_keys=True,
        )
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def get(self, *extra: str, fault: str = "") -> Path:
        """The reference run folder for the chaos job with these overrides (run now if not cached)."""
        key = self.key(extra, fault)
        run_dir = self.root / key
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / f"{key}.lock", "w") as lock:  # two processes asking at once: one runs it
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (run_dir / "DONE").is_file():
                self._run(run_dir, extra, fault)
        return run_dir

    def _run(self, run_dir: Path, extra: tuple[str, ...], fault: str) -> None:
        import shutil

        shutil.rmtree(run_dir, ignore_errors=True)
        env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", ORCH_FAULT=fault)
        for name in ("ORCH_FAULT_ONCE", "ORCH_FAULT_RELEASE"):
            env.pop(name, None)
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "training.main",
            str(JOB),
            *overrides(self.data_dir, *extra),
            "--run-dir",
            str(run_dir),
        ]
        result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
        if result.returncode != 0:
            raise RuntimeError(
                f"reference run failed ({result.returncode}): {result.stdout[-2000:]}{result.stderr[-2000:]}"
            )
        about = {"overrides": list(extra), "fault": fault, "code": self.code, "machine": self.machine}
        (run_dir / "config.key.json").write_text(json.dumps(about) + "\n")
        (run_dir / "DONE").touch()
