"""Job specs: every way a YAML file or an override can be wrong gives one clear paragraph and exit 2."""

import subprocess
import sys
from pathlib import Path

import pytest

from jobspec import SpecError, load_spec

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def job(tmp_path):
    def write(text: str) -> str:
        path = tmp_path / "job.yaml"
        path.write_text(text)
        return str(path)
    return write


def test_file_and_overrides_merge_with_types(job):
    cfg = load_spec(job("train:\n  max_steps: 5\nmodel:\n  n_layer: 3\n"), ["train.max_steps=50", "optim.lr=0.01"])
    assert cfg.train.max_steps == 50 and isinstance(cfg.train.max_steps, int)
    assert cfg.model.n_layer == 3
    assert cfg.optim.lr == pytest.approx(0.01)
    assert cfg.data.sources == ["demo"]


def test_shipped_job_files_load():
    for path in sorted((REPO / "jobs").glob("*.yaml")):
        if path.name.startswith("pipeline"):
            continue
        load_spec(str(path))


def test_unknown_key_in_override_suggests_the_near_miss(job):
    with pytest.raises(SpecError) as e:
        load_spec(job(""), ["trian.max_steps=5"])
    msg = str(e.value)
    assert "trian.max_steps" in msg and "'5'" in msg and "Did you mean 'train.max_steps'" in msg
    assert "command line override" in msg


def test_unknown_key_in_file_names_file_key_and_value(job):
    path = job("model:\n  n_layr: 4\n")
    with pytest.raises(SpecError) as e:
        load_spec(path)
    msg = str(e.value)
    assert msg.startswith(path) and "model.n_layr" in msg and "4" in msg and "model.n_layer" in msg


def test_wrong_type_names_key_and_value(job):
    with pytest.raises(SpecError) as e:
        load_spec(job("train:\n  max_steps: five\n"))
    assert "train.max_steps" in str(e.value) and "'five'" in str(e.value)


def test_malformed_yaml_names_line(job):
    with pytest.raises(SpecError) as e:
        load_spec(job("train:\n  max_steps: 5\n bad: [\n"))
    assert "malformed" in str(e.value) and "line 3" in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(SpecError, match="no such job file"):
        load_spec(str(tmp_path / "nope.yaml"))


def test_missing_data_path_names_the_key(job, tmp_path):
    missing = str(tmp_path / "corpus")
    with pytest.raises(SpecError) as e:
        load_spec(job(f"data:\n  sources: [{missing}]\n"))
    assert "data.sources[0]" in str(e.value) and missing in str(e.value)


def test_values_out_of_range(job):
    with pytest.raises(SpecError, match="train.micro_batch_size"):
        load_spec(job(""), ["train.micro_batch_size=0"])
    with pytest.raises(SpecError, match="data.seq_len"):
        load_spec(job(""), ["data.seq_len=4096"])
    with pytest.raises(SpecError, match="executor"):
        load_spec(job(""), ["executor=kubernetes"])


def test_unknown_kind_suggests(job):
    with pytest.raises(SpecError, match="Did you mean 'pretrain'"):
        load_spec(job("kind: pretrian\n"))


def run_orch(*args, cwd):
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=cwd,
                          capture_output=True, text=True, env={"PYTHONPATH": str(REPO), "ORCH_HOME": str(cwd / ".orch"),
                                                               "PATH": "/usr/bin:/bin"})


@pytest.mark.parametrize("contents, override, needle", [
    ("train:\n  max_steps: 5\n bad: [\n", None, "malformed"),
    ("", "trian.max_steps=5", "Did you mean 'train.max_steps'"),
    ("data:\n  sources: [/no/such/corpus]\n", None, "/no/such/corpus"),
])
def test_orch_submit_bad_input_exits_2_and_submits_nothing(tmp_path, contents, override, needle):
    job_file = tmp_path / "job.yaml"
    job_file.write_text(contents)
    args = ["submit", str(job_file)] + ([override] if override else [])
    result = run_orch(*args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert needle in result.stderr
    assert result.stderr.count("\n") == 1, "one paragraph, no traceback"
    assert not (tmp_path / "runs").exists()


def test_orch_config_prints_resolved_yaml(tmp_path):
    job_file = tmp_path / "job.yaml"
    job_file.write_text("train:\n  max_steps: 5\n")
    result = run_orch("config", str(job_file), "model.n_layer=7", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "max_steps: 5" in result.stdout and "n_layer: 7" in result.stdout
