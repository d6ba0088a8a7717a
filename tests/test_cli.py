"""The command line as scripts use it: a version, JSON output, and a misspelled command named back."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO, env_for


def orch(tmp_path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args],
        cwd=tmp_path,
        env=env_for(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_version_prints_the_installed_version(tmp_path):
    result = orch(tmp_path, "--version")
    assert result.returncode == 0
    assert result.stdout.startswith("orch ") and result.stdout.split()[1][0].isdigit()


def test_a_misspelled_command_is_named_with_the_nearest_one(tmp_path):
    result = orch(tmp_path, "sumbit", "jobs/pretrain.yaml")
    assert result.returncode == 2
    assert "unknown command 'sumbit'; did you mean `orch submit`?" in result.stderr
    assert "Traceback" not in result.stderr


def test_config_json_is_the_resolved_config(tmp_path):
    result = orch(tmp_path, "config", str(REPO / "jobs" / "pretrain.yaml"), "model.n_layer=3", "--json")
    assert result.returncode == 0, result.stderr
    cfg = json.loads(result.stdout)
    assert cfg["kind"] == "pretrain" and cfg["model"]["n_layer"] == 3


def test_config_json_of_a_pipeline_has_one_object_per_stage(tmp_path):
    result = orch(tmp_path, "config", str(REPO / "jobs" / "pipeline.yaml"), "--json")
    assert result.returncode == 0, result.stderr
    stages = json.loads(result.stdout)
    assert "pretrain" in stages and stages["pretrain"]["kind"] == "pretrain"


def test_runs_json_lists_registered_runs(tmp_path):
    assert json.loads(orch(tmp_path, "runs", "--json").stdout) == []
    # A registered run, through the same function `orch submit` uses, without starting it.
    code = (
        "from jobspec import load_spec; from orchestrator.registry import Registry; "
        "from orchestrator.runs import register_run; "
        f"cfg = load_spec({str(REPO / 'jobs' / 'pretrain.yaml')!r}, [], launch=True); cfg.executor = 'local'; "
        "print(register_run(Registry(), cfg, 'local').id)"
    )
    made = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env_for(tmp_path), capture_output=True, text=True, timeout=120
    )
    assert made.returncode == 0, made.stderr
    runs = json.loads(orch(tmp_path, "runs", "--json").stdout)
    assert [r["id"] for r in runs] == [made.stdout.strip()]
    assert runs[0]["kind"] == "pretrain" and isinstance(runs[0]["attempts"], int)


def test_config_without_a_job_file_asks_for_one(tmp_path):
    result = orch(tmp_path, "config")
    assert result.returncode == 2
    assert "which job?" in result.stderr and "overrides" not in result.stderr
