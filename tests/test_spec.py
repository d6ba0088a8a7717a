"""Job specs: every way a YAML file or an override can be wrong gives one clear paragraph and exit 2."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

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
        if yaml.safe_load(path.read_text()).get("kind") in ("pipeline", "sweep"):
            continue  # their own loaders (tests/test_spec_bounds.py loads the pipelines)
        load_spec(str(path))


def test_unknown_key_in_override_suggests_the_near_miss(job):
    with pytest.raises(SpecError) as e:
        load_spec(job("kind: pretrain\n"), ["trian.max_steps=5"])
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
        load_spec(job("kind: pretrain\n"), ["train.micro_batch_size=0"])
    with pytest.raises(SpecError, match="data.seq_len"):
        load_spec(job("kind: pretrain\n"), ["data.seq_len=4096"])
    with pytest.raises(SpecError, match="executor"):
        load_spec(job("kind: pretrain\n"), ["executor=kubernetes"])


def test_unknown_kind_suggests(job):
    with pytest.raises(SpecError, match="Did you mean 'pretrain'"):
        load_spec(job("kind: pretrian\n"))


def run_orch(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(REPO), "ORCH_HOME": str(cwd / ".orch"), "PATH": "/usr/bin:/bin"},
    )


@pytest.mark.parametrize(
    "contents, override, needle",
    [
        ("train:\n  max_steps: 5\n bad: [\n", None, "malformed"),
        ("kind: pretrain\n", "trian.max_steps=5", "Did you mean 'train.max_steps'"),
        ("data:\n  sources: [/no/such/corpus]\n", None, "/no/such/corpus"),
    ],
)
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


# ---------------------------------------------------------------- values that used to fail only on the nodes


@pytest.mark.parametrize(
    "contents, overrides, needle",
    [
        (
            "kind: pretrain\ntrain:\n  max_steps: 5\ntrain:\n  log_every: 1\n",
            [],
            "line 4: key 'train' is written twice",
        ),
        ("kind: pretrain\nname: a\nname: b\n", [], "line 3: key 'name' is written twice (first at line 2)"),
        ("", [], "the file is empty"),
        ("# only a comment\n", [], "the file is empty"),
        ("kind: pretrain\ntrain:\n  max_steps: 99999999999999999999999999999\n", [], "line 3: key 'train.max_steps'"),
        ("kind: pretrain\n", ["train.max_steps=99999999999999999999999999999"], "beyond what a 64-bit integer holds"),
        ("kind: pretrain\noptim:\n  lr: .inf\n", [], "line 3: key 'optim.lr' has the value inf"),
        ("kind: pretrain\nname: ../outside\n", [], "key 'name' has the value '../outside'"),
        ("kind: pretrain\nname: a/b\n", [], "letters, digits"),
        ("kind: pretrain\nname: \"a\\nb\"\n", [], "control character"),
        ("kind: pretrain\nresources:\n  partition: \"gpu\\n#SBATCH --uid=0\"\n", [], "resources.partition"),
        ("kind: pretrain\nresources:\n  account: \"a b\"\n", [], "resources.account"),
        ("kind: pretrain\nresources:\n  sbatch_extra: [\"--exclusive\\nrm -rf /\"]\n", [], "control character"),
        ("kind: pretrain\n", ["checkpoint.keep_last=0"], "checkpoint.keep_last"),
        ("kind: pretrain\n", ["checkpoint.keep_last=-1"], "at least 1"),
        ("kind: pretrain\n", ["train.log_every=0"], "train.log_every"),
        ("kind: pretrain\n", ["resources.nodes=0"], "resources.nodes"),
        ("kind: pretrain\n", ["resources.nproc_per_node=0"], "resources.nproc_per_node"),
        ("kind: pretrain\n", ["resources.cpus_per_task=0"], "resources.cpus_per_task"),
        ("kind: pretrain\n", ["resources.time_min=0"], "resources.time_min"),
        ("kind: pretrain\n", ["resources.max_retries=-1"], "resources.max_retries"),
        ("kind: pretrain\n", ["model.vocab_size=100"], "smaller than the tokenizer's 4096 tokens"),
        ("kind: pretrain\n", ["model.n_kv_head=3"], "model.n_kv_head"),
        (
            "kind: pretrain\n",
            ["parallel.tp=3", "resources.nproc_per_node=3"],
            "must divide the model's 4 attention heads",
        ),
        ("kind: pretrain\n", ["parallel.tp=2", "model.n_kv_head=1", "resources.nproc_per_node=2"], "1 key/value heads"),
        (
            "kind: pretrain\n",
            ["parallel.tp=2"],
            "does not divide the job's resources.nodes x resources.nproc_per_node = 1",
        ),
        ("kind: rm\n", ["parallel.tp=2", "resources.nproc_per_node=2"], "reward model's head is not tensor-parallel"),
    ],
)
def test_values_that_would_fail_on_the_nodes_are_refused_at_submit(tmp_path, contents, overrides, needle):
    job_file = tmp_path / "job.yaml"
    job_file.write_text(contents)
    result = run_orch("submit", str(job_file), *overrides, "executor=local", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert needle in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1, "one paragraph, no traceback"
    assert not (tmp_path / "runs").exists() and not (tmp_path / ".orch").exists(), "nothing registered"


def test_torchrun_takes_its_world_size_from_torchrun_not_resources(tmp_path):
    """tp against the world size is a submit-time check: a trainer launched by torchrun sizes itself."""
    cfg = load_spec(str(REPO / "jobs" / "pretrain.yaml"), ["parallel.tp=2"])
    assert cfg.parallel.tp == 2
