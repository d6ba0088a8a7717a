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
    "model.n_layer=2",
    "model.n_head=4",
    "model.n_kv_head=2",
    "model.d_model=64",
    "model.max_seq_len=64",
    "data.seq_len=64",
    "data.vocab_size=512",
    "data.max_docs=200",
    "train.micro_batch_size=8",
    "train.log_every=5",
    "train.val_every=0",
    "train.val_batches=4",
    "optim.warmup_steps=5",
    "optim.lr=3e-3",
    "train.dtype=fp32",
    "train.device=cpu",
    "train.compile=false",  # the demo compiles (20 s of start-up); tests of compiling ask for it
]


def env_for(tmp: Path) -> dict:
    # The repo first; a PYTHONPATH already set (packages carried to a GPU machine) stays behind it.
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, PYTHONPATH=path, ORCH_HOME=str(tmp / ".orch"), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return env


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> str:
    """The tiny job's MDS shards, prepared once per test session."""
    root = tmp_path_factory.mktemp("data")
    data_dir = root / "demo-tiny"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "orchestrator.cli",
            "data",
            "prepare",
            str(REPO / "jobs" / "pretrain.yaml"),
            *TINY,
            f"data.dir={data_dir}",
        ],
        cwd=root,
        env=env_for(root),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    return str(data_dir)


def tiny_overrides(data_dir: str, *extra: str) -> list[str]:
    return [*TINY, f"data.dir={data_dir}", *extra]


POSTTRAIN_SEQ = 256  # post-training rows; the tiny source model is pretrained with rotary tables this long
DEMO_FILES = {
    "sft": ("sft_train", "sft_val"),
    "dpo": ("pref_train", "pref_val"),
    "rm": ("pref_train", "pref_val"),
    "grpo": ("grpo_train", "grpo_val"),
}


@pytest.fixture(scope="session")
def posttrain_source(tmp_path_factory, tiny_data) -> dict:
    """The starting point of every post-training test, made once per session: a tiny pretraining run (20
    steps of the TINY model, rotary tables of POSTTRAIN_SEQ) and the demo SFT, preference and GRPO files
    derived from the 200 standard-library files of tiny_data. Each module runs its jobs in a folder of its own."""
    from training.posttrain.demo_data import write_demo_data

    root = tmp_path_factory.mktemp("posttrain-source")
    run = root / "pretrain"
    cmd = [
        sys.executable,
        "-m",
        "training.main",
        str(REPO / "jobs" / "pretrain.yaml"),
        *tiny_overrides(tiny_data, f"model.max_seq_len={POSTTRAIN_SEQ}", "train.max_steps=20"),
        "--run-dir",
        str(run),
    ]
    result = subprocess.run(cmd, cwd=root, env=env_for(root), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    paths = write_demo_data(
        root / "posttrain", Path(tiny_data) / "tokenizer.json", max_docs=200, max_tokens=POSTTRAIN_SEQ
    )
    return {"run": run, "tokenizer": Path(tiny_data) / "tokenizer.json", **paths}


def posttrain_command(kind: str, source: dict, run_dir: Path, *extra: str, nproc: int = 1) -> list[str]:
    """A tiny post-training job of this kind from posttrain_source, on its demo files, logging every step."""
    train, val = DEMO_FILES[kind]
    overrides = [
        *TINY,
        f"model.max_seq_len={POSTTRAIN_SEQ}",
        f"data.seq_len={POSTTRAIN_SEQ}",
        f"checkpoint.init_from={source['run']}",
        f"{kind}.train_file={source[train]}",
        f"{kind}.val_file={source[val]}",
        "optim.lr=1e-3",
        "train.log_every=1",
        *extra,
    ]
    launcher = (
        [sys.executable]
        if nproc == 1
        else [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    )
    job = str(REPO / "jobs" / f"{kind}.yaml")
    return [*launcher, "-m", "training.main", job, *overrides, "--run-dir", str(run_dir)]
