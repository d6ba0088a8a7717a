"""Shared fixtures: a tiny job that trains in seconds on the CPU, over real files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# A GPT of ~0.2M parameters on 200 standard-library files: seconds per run on 2 cores.
TINY = [
    "model.n_layer=2", "model.n_head=4", "model.n_kv_head=2", "model.d_model=64", "model.max_seq_len=64",
    "data.seq_len=64", "data.vocab_size=512", "data.max_docs=200",
    "train.micro_batch_size=8", "train.log_every=5", "train.val_every=0", "train.val_batches=4",
    "optim.warmup_steps=5", "optim.lr=3e-3", "train.dtype=fp32", "train.device=cpu",
]


def env_for(tmp: Path) -> dict:
    # The repo first; a PYTHONPATH already set (packages carried to a GPU machine) stays behind it.
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, PYTHONPATH=path, ORCH_HOME=str(tmp / ".orch"), PYTHONUNBUFFERED="1",
               OMP_NUM_THREADS="1")
    return env


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> str:
    """The tiny job's MDS shards, prepared once per test session."""
    root = tmp_path_factory.mktemp("data")
    data_dir = root / "demo-tiny"
    result = subprocess.run([sys.executable, "-m", "orchestrator.cli", "data", "prepare",
                             str(REPO / "jobs" / "pretrain.yaml"), *TINY, f"data.dir={data_dir}"],
                            cwd=root, env=env_for(root), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return str(data_dir)


def tiny_overrides(data_dir: str, *extra: str) -> list[str]:
    return [*TINY, f"data.dir={data_dir}", *extra]
