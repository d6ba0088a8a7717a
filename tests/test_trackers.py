"""Trackers beside metrics.jsonl: TensorBoard's own reader sees each step once, with metrics.jsonl's values, also
for a run killed after its last checkpoint and resumed (the recomputed steps replace what the killed run wrote)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, env_for, tiny_overrides

JOB = str(REPO / "jobs" / "pretrain.yaml")
pytest.importorskip("tensorboard")


def train(run_dir: Path, data_dir: str, *extra: str, fault: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "training.main", JOB,
                           *tiny_overrides(data_dir, "logging.backends=[jsonl,tensorboard]", "train.log_every=1",
                                           "train.max_steps=12", "checkpoint.every=4", *extra),
                           "--run-dir", str(run_dir)],
                          cwd=run_dir.parent, env=dict(env_for(run_dir.parent), ORCH_FAULT=fault),
                          capture_output=True, text=True, timeout=600)


def tensorboard_scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))  # purge_orphaned_data: as TensorBoard shows them
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def jsonl_values(run_dir: Path, key: str) -> dict[int, float]:
    """The last value metrics.jsonl holds for each step (a resumed run appends the recomputed steps again)."""
    values = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if key in record:
            values[record["step"]] = record[key]
    return values


@pytest.mark.slow
def test_a_killed_and_resumed_run_shows_each_step_once_in_tensorboard(tmp_path, tiny_data):
    run = tmp_path / "run"
    killed = train(run, tiny_data, fault="train.after_optimizer_step#10:kill")  # steps 9, 10 after step 8's save
    assert killed.returncode != 0
    written_before = [s for s, _ in tensorboard_scalars(run, "loss")]
    assert max(written_before) >= 9, "the killed run had logged steps past its last checkpoint"
    resumed = train(run, tiny_data)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout

    shown = tensorboard_scalars(run, "loss")
    steps = [s for s, _ in shown]
    assert steps == sorted(set(steps)) == list(range(1, 13)), steps  # each step exactly once, in order
    expected = jsonl_values(run, "loss")
    assert [v for _, v in shown] == pytest.approx([expected[s] for s in steps], rel=1e-6)
    assert (run / "tensorboard").is_dir() and any((run / "tensorboard").iterdir())


def test_an_unknown_tracker_is_refused_with_the_key(tmp_path):
    result = subprocess.run([sys.executable, "-m", "orchestrator.cli", "config", JOB, "logging.backends=[jsonl,comet]"],
                            cwd=tmp_path, env=env_for(tmp_path), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "logging.backends[1]" in result.stderr and "comet" in result.stderr
