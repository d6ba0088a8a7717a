"""Runs found by name: checkpoint.init_from and eval.source take a run name (`pretrain` = its newest COMPLETED run,
`pretrain-3f2a1c` = that run) or a folder, checked and resolved to a path at `orch submit` / `orch config`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from orchestrator.registry import Registry, Run, now
from tests.conftest import REPO, TINY, env_for, tiny_overrides

SFT = str(REPO / "jobs" / "sft.yaml")


def orch(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args],
        cwd=tmp_path,
        env=env_for(tmp_path),
        capture_output=True,
        text=True,
        timeout=600,
    )


def registered(tmp_path: Path, run_id: str, state: str, run_dir: Path, created_at: float) -> None:
    Registry(tmp_path / ".orch" / "registry.db").add(
        Run(
            id=run_id,
            name=run_id.rsplit("-", 1)[0],
            kind="pretrain",
            executor="local",
            state=state,
            run_dir=str(run_dir),
            created_at=created_at,
        )
    )


def committed_checkpoint(run_dir: Path) -> Path:
    """A run folder with a committed checkpoint as the trainer leaves it (its manifest written last)."""
    step = run_dir / "checkpoints" / "step_00000010"
    step.mkdir(parents=True)
    (step / "manifest.json").write_text(json.dumps({"files": {}}))
    return run_dir


def test_a_missing_init_from_folder_is_refused_by_orch_config(tmp_path):
    result = orch(tmp_path, "config", SFT, "checkpoint.init_from=/nonexistent")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "'checkpoint.init_from' has the value '/nonexistent', but no such folder exists" in result.stderr


def test_a_folder_without_a_checkpoint_is_refused(tmp_path):
    (tmp_path / "empty-run" / "checkpoints").mkdir(parents=True)
    result = orch(tmp_path, "config", SFT, f"checkpoint.init_from={tmp_path / 'empty-run'}")
    assert result.returncode == 2 and "holds no committed checkpoint" in result.stderr, result.stderr


def test_a_name_with_no_completed_run_exits_2_naming_the_key_and_the_nearest_runs(tmp_path):
    registered(tmp_path, "pretrain-aaaaaa", "FAILED", tmp_path / "runs" / "pretrain-aaaaaa", now())
    registered(tmp_path, "pretrain_v2-bbbbbb", "COMPLETED", tmp_path / "runs" / "pretrain_v2-bbbbbb", now())
    result = orch(tmp_path, "submit", SFT, "executor=local")
    assert result.returncode == 2, result.stdout + result.stderr
    err = result.stderr
    assert "key 'checkpoint.init_from' has the value 'pretrain', which names no COMPLETED run" in err
    assert "runs named 'pretrain': pretrain-aaaaaa (FAILED); the nearest runs: pretrain_v2-bbbbbb (COMPLETED)" in err
    assert len(Registry(tmp_path / ".orch" / "registry.db").list()) == 2  # nothing was registered

    result = orch(tmp_path, "submit", SFT, "executor=local", "checkpoint.init_from=pretrian")  # a typo
    assert result.returncode == 2 and "the nearest runs: " in result.stderr and "pretrain-aaaaaa" in result.stderr


def test_a_name_resolves_to_the_newest_completed_run_and_an_id_to_that_run(tmp_path):
    old = committed_checkpoint(tmp_path / "runs" / "pretrain-000001")
    new = committed_checkpoint(tmp_path / "runs" / "pretrain-000002")
    registered(tmp_path, "pretrain-000001", "COMPLETED", old, 1.0)
    registered(tmp_path, "pretrain-000002", "COMPLETED", new, 2.0)
    registered(tmp_path, "pretrain-000003", "FAILED", tmp_path / "runs" / "pretrain-000003", 3.0)
    for value, expected in (("pretrain", new), ("pretrain-000001", old)):
        result = orch(tmp_path, "config", SFT, f"checkpoint.init_from={value}", "--json")
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["checkpoint"]["init_from"] == str(expected)
    result = orch(tmp_path, "config", str(REPO / "jobs" / "eval.yaml"), "eval.source=pretrain-000001", "--json")
    assert result.returncode == 0 and json.loads(result.stdout)["eval"]["source"] == str(old), result.stderr


@pytest.mark.slow
def test_pretrain_then_sft_by_name_as_two_commands(tmp_path, tiny_data):
    runs = f"runs_dir={tmp_path / 'runs'}"
    pretrain = orch(
        tmp_path,
        "submit",
        str(REPO / "jobs" / "pretrain.yaml"),
        *tiny_overrides(tiny_data, "train.max_steps=6", "executor=local", runs),
        "--follow",
    )
    assert pretrain.returncode == 0 and "COMPLETED" in pretrain.stdout, pretrain.stdout[-3000:] + pretrain.stderr
    examples = [
        {"prompt": f"Write a function returning {i}.", "completion": f"def f():\n    return {i}"} for i in range(40)
    ]
    for split in ("train", "val"):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(e) + "\n" for e in examples))

    sft = orch(
        tmp_path,
        "submit",
        SFT,  # checkpoint.init_from: pretrain, as shipped
        *TINY,
        "train.max_steps=3",
        "executor=local",
        runs,
        f"sft.train_file={tmp_path / 'train.jsonl'}",
        f"sft.val_file={tmp_path / 'val.jsonl'}",
        "--follow",
    )
    assert sft.returncode == 0 and "COMPLETED" in sft.stdout, sft.stdout[-3000:] + sft.stderr[-3000:]
    (pretrain_dir,) = (tmp_path / "runs").glob("pretrain-*")
    (sft_dir,) = (tmp_path / "runs").glob("sft-*")
    written = OmegaConf.load(sft_dir / "config.yaml")
    assert written.checkpoint.init_from == str(pretrain_dir)  # the path, not the name: the nodes look nothing up
    assert json.loads((sft_dir / "summary.json").read_text())["step"] == 3
