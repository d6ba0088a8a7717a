"""A resumed run ends with the same random-number generators as an uninterrupted one: the trainer seeds Python's,
NumPy's and torch's global generators from the job's seed and rank, and nothing draws from them in a way that
depends on where the run was interrupted (data loaders bring their own generator)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, env_for, tiny_overrides

pytestmark = pytest.mark.slow
JOB = str(REPO / "jobs" / "pretrain.yaml")
STEPS = ["train.max_steps=8", "checkpoint.every=4", "data.num_workers=1"]


def train(run_dir: Path, data_dir: str, fault: str = "") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "training.main", JOB, *tiny_overrides(data_dir, *STEPS), "--run-dir", str(run_dir)],
        cwd=run_dir.parent,
        env=dict(env_for(run_dir.parent), ORCH_FAULT=fault),
        capture_output=True,
        text=True,
        timeout=600,
    )


def rng_files(run_dir: Path) -> dict[str, dict]:
    folder = run_dir / "checkpoints" / "step_00000008" / "rng"
    return {p.name: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}


def test_a_killed_and_resumed_run_ends_with_the_uninterrupted_runs_rng_states(tmp_path, tiny_data):
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    assert train(whole, tiny_data).returncode == 0
    killed = train(broken, tiny_data, fault="train.after_optimizer_step#6:kill")
    assert killed.returncode != 0
    resumed = train(broken, tiny_data)
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stderr[-2000:]
    ours, theirs = rng_files(broken), rng_files(whole)
    assert ours and ours.keys() == theirs.keys()
    for name in ours:
        for generator in theirs[name]:
            assert ours[name][generator] == theirs[name][generator], f"{name}: {generator} differs"


def test_the_global_generators_follow_the_seed_and_the_rank():
    from training.checkpoint import rng_state, seed_globals

    def state(seed, rank):
        seed_globals(seed, rank)
        return rng_state()

    assert state(1337, 0) == state(1337, 0)
    assert state(1337, 0)["torch"] != state(7, 0)["torch"]
    assert state(1337, 0)["python"] != state(1337, 1)["python"]
