"""What a run tells about itself besides metrics.jsonl, checked on a run killed after its last checkpoint and
resumed: TensorBoard's own reader sees each step once, with metrics.jsonl's values (the recomputed steps replace
what the killed attempt wrote), and goodput.json counts the recomputed steps as lost work, its buckets adding up to
the wall time."""

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
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "training.main",
            JOB,
            *tiny_overrides(
                data_dir,
                "logging.backends=[jsonl,tensorboard]",
                "train.log_every=1",
                "train.max_steps=12",
                "checkpoint.every=4",
                *extra,
            ),
            "--run-dir",
            str(run_dir),
        ],
        cwd=run_dir.parent,
        env=dict(env_for(run_dir.parent), ORCH_FAULT=fault),
        capture_output=True,
        text=True,
        timeout=600,
    )


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
def test_a_killed_and_resumed_run_shows_each_step_once_and_counts_its_lost_work(tmp_path, tiny_data):
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

    account = json.loads((run / "goodput.json").read_text())
    assert account["attempts"] == 2
    # Step 9 was trained again after step 8's checkpoint; the killed attempt died inside step 10, never counted
    assert account["lost_steps"] == 1
    buckets = account["buckets_s"]
    assert buckets["lost"] > 0 and buckets["productive"] > buckets["lost"]
    assert sum(buckets.values()) == pytest.approx(account["wall_s"], rel=0.01)
    assert account["goodput"] == pytest.approx(buckets["productive"] / account["wall_s"], abs=1e-4)


def test_goodput_sums_attempts_and_the_gaps_between_them():
    from training.goodput import summarize

    def attempt(start, last, **buckets):
        return {"start": start, "last": last, "buckets": buckets, "lost_steps": buckets.get("lost", 0) and 2}

    account = summarize(
        [
            attempt(100.0, 160.0, productive=40.0, restart=10.0, checkpoint=5.0, other=5.0),
            attempt(170.0, 200.0, productive=20.0, lost=4.0, restart=6.0),
        ]
    )
    assert account["wall_s"] == 100.0 and account["attempts"] == 2 and account["lost_steps"] == 2
    assert account["buckets_s"]["interrupted"] == 10.0  # 160 -> 170: killed after its last record, restarted
    assert account["buckets_s"]["productive"] == 60.0 and account["goodput"] == 0.6


def test_an_unknown_tracker_is_refused_with_the_key(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "config", JOB, "logging.backends=[jsonl,comet]"],
        cwd=tmp_path,
        env=env_for(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "logging.backends[1]" in result.stderr and "comet" in result.stderr


def test_the_eval_report_shows_each_stages_goodput(tmp_path):
    from training.evaluate.report import write_report
    from training.goodput import summarize

    pretrain = tmp_path / "pretrain"
    pretrain.mkdir()
    attempts = [
        {"start": 0.0, "last": 50.0, "buckets": {"productive": 40.0, "restart": 10.0}, "lost_steps": 0},
        {"start": 55.0, "last": 100.0, "buckets": {"productive": 30.0, "lost": 5.0, "restart": 10.0}, "lost_steps": 3},
    ]
    (pretrain / "goodput.json").write_text(json.dumps({**summarize(attempts), "per_attempt": attempts}))
    stages = {
        "pretrain": {"run_dir": str(pretrain), "checkpoint": "c", "metrics": {}},
        "hf": {"run_dir": None, "checkpoint": "h", "metrics": {}},  # a Hugging Face folder: no run, no goodput
    }
    report = write_report(tmp_path, {"stages": stages}).read_text()
    assert "## Goodput" in report
    row = next(line for line in report.splitlines() if line.startswith("| pretrain | 0.7 |"))
    assert row.split(" | ")[1:5] == ["0.7", "100.0", "2", "3"]  # goodput, wall s, attempts, lost steps
    assert "| hf | - |" in report
