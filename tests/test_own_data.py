"""Your own data without naming a folder: data.dir: null puts the prepared data in data/prepared/<fingerprint of
the data config>, prepared once and shared; a folder that holds other data is refused at submit; a warmup that
does not fit the run is scaled at submit with a note."""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from jobspec import SpecError, load_spec
from jobspec.prepared_data import DATA_ROOT, DEMO_DIR, fingerprint
from orchestrator.registry import Registry
from tests.conftest import REPO, TINY, env_for

PRETRAIN = str(REPO / "jobs" / "pretrain.yaml")


def orch(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args],
        cwd=tmp_path,
        env={**env_for(tmp_path), **env},
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_data_dir_defaults_to_the_demo_folder_or_one_named_by_the_data_config(tmp_path):
    (tmp_path / "my.jsonl").write_text('{"text": "hello"}\n')
    assert load_spec(PRETRAIN).data.dir == DEMO_DIR
    mine = load_spec(PRETRAIN, [f"data.sources=[{tmp_path / 'my.jsonl'}]"])
    assert mine.data.dir == f"{DATA_ROOT}/{fingerprint(mine.data)}"
    bigger = load_spec(PRETRAIN, ["data.vocab_size=8192"])  # the demo, tokenized otherwise: not data/demo's folder
    assert bigger.data.dir == f"{DATA_ROOT}/{fingerprint(bigger.data)}" != mine.data.dir
    assert load_spec(PRETRAIN, ["data.dir=elsewhere"]).data.dir == "elsewhere"


def test_a_data_dir_holding_other_data_is_refused_at_submit(tmp_path):
    other = tmp_path / "prepared"
    other.mkdir()
    (other / "meta.json").write_text(json.dumps({"fingerprint": "0" * 16, "config": {"vocab_size": 300}}))
    result = orch(tmp_path, "submit", PRETRAIN, f"data.dir={other}", "executor=local")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "key 'data.dir'" in result.stderr and "holds data made from another data config" in result.stderr
    assert (
        not Path(tmp_path / ".orch" / "registry.db").exists() or not Registry(tmp_path / ".orch" / "registry.db").list()
    )
    (other / "meta.json").unlink()
    (other / "notes.txt").write_text("mine")
    result = orch(tmp_path, "config", PRETRAIN, f"data.dir={other}")
    assert result.returncode == 2 and "is not prepared data (no meta.json)" in result.stderr, result.stderr


@pytest.mark.parametrize(
    "overrides, warmup, words",
    [
        (["train.max_steps=30"], 3, "optim.warmup_steps=50 is longer than the run (train.max_steps=30)"),
        (["train.max_steps=60"], 48, "overlapping the wsd decay (the last 12 of 60 steps"),
        (["train.max_steps=30", "optim.schedule=cosine"], 3, "longer than the run"),
        (["train.max_steps=600"], 50, None),
    ],
)
def test_a_warmup_that_does_not_fit_the_run_is_scaled_with_a_note(tmp_path, overrides, warmup, words):
    result = orch(tmp_path, "config", PRETRAIN, *overrides, "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["optim"]["warmup_steps"] == warmup
    assert (words in result.stderr) if words else "note:" not in result.stderr


def own_jsonl(path: Path, docs: int = 200) -> Path:
    """Standard-library modules as a user's JSON lines: {"text": ...} each."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:docs]
    path.write_text("".join(json.dumps({"text": f.read_text(errors="replace")}) + "\n" for f in files))
    return path


def folders(root: Path) -> list[Path]:
    """The prepared folders (beside each, its preparation lock file)."""
    return sorted(p for p in root.iterdir() if p.is_dir())


@pytest.mark.slow
def test_own_jsonl_pretrained_twice_without_naming_data_dir(tmp_path):
    data = own_jsonl(tmp_path / "my.jsonl")
    job = [PRETRAIN, *TINY, f"data.sources=[{data}]", "data.val_fraction=0.1", "train.max_steps=6"]
    # executor: auto as shipped; no Slurm answers with SLURM_CONF pointing nowhere, so it says it runs here
    first = orch(tmp_path, "submit", *job, "--follow", SLURM_CONF=str(tmp_path / "no-slurm.conf"))
    assert first.returncode == 0 and "COMPLETED" in first.stdout, first.stdout[-3000:] + first.stderr[-3000:]
    assert "executor: auto -> local (no Slurm cluster answers)" in first.stdout
    (prepared,) = folders(tmp_path / DATA_ROOT)
    made = (prepared / "meta.json").stat()
    second = orch(tmp_path, "submit", *job, "executor=local", "--follow")
    assert second.returncode == 0 and "COMPLETED" in second.stdout, second.stdout[-3000:] + second.stderr[-3000:]

    assert [p.name for p in folders(tmp_path / DATA_ROOT)] == [prepared.name]  # one folder, prepared once:
    again = (prepared / "meta.json").stat()
    assert (again.st_ino, again.st_mtime_ns) == (made.st_ino, made.st_mtime_ns)  # the second run read it as it was
    runs = sorted(Registry(tmp_path / ".orch" / "registry.db").list(), key=lambda r: r.created_at)
    assert [r.state for r in runs] == ["COMPLETED", "COMPLETED"]
    for run in runs:
        assert OmegaConf.load(Path(run.run_dir) / "config.yaml").data.dir == f"{DATA_ROOT}/{prepared.name}"


def test_load_spec_without_a_registry_refuses_a_run_name():
    with pytest.raises(SpecError, match="run names are looked up in the run registry"):
        load_spec(str(REPO / "jobs" / "sft.yaml"), ["executor=local"], launch=True)
