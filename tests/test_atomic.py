"""jobspec/atomic.py: a write that fails, or a writer killed at any step, leaves the previous file whole or the new
one, never half of one."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from jobspec import atomic
from tests.conftest import REPO


def test_a_write_replaces_the_file_whole(tmp_path):
    path = tmp_path / "state.json"
    atomic.write_json(path, {"step": 1})
    atomic.write_json(path, {"step": 2}, durable=True)
    assert json.loads(path.read_text()) == {"step": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "state.json"
    atomic.write_json(path, {"step": 1})
    with pytest.raises(TypeError):
        atomic.write_json(path, {"step": object()})  # fails before a byte is written
    target = tmp_path / "folder"
    (target / "inside").mkdir(parents=True)
    with pytest.raises(OSError):
        atomic.write_text(target, "x")  # the rename fails: a non-empty folder is in the way
    assert json.loads(path.read_text()) == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "state.json"]


@pytest.mark.parametrize("point,survives", [("atomic.written", {"step": 1}), ("atomic.replaced", {"step": 2})])
def test_a_writer_killed_at_each_step_leaves_the_old_file_or_the_new_one(tmp_path, point, survives):
    path = tmp_path / "state.json"
    code = (
        "import sys; from jobspec import atomic\n"
        f"atomic.write_json({str(path)!r}, {{'step': 1}}, durable=True)\n"
        f"atomic.write_json({str(path)!r}, {{'step': 2}}, durable=True)\n"
    )
    env = {**os.environ, "ORCH_FAULT": f"{point}#2:kill", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 137, result.stderr
    assert json.loads(path.read_text()) == survives
