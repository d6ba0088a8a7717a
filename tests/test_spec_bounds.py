"""The job contract's bounds: every numeric key has a range, names are whole-line matches, values are checked after
${...} interpolation, YAML aliases can't blow a file up, and sbatch_extra can't replace what orch sets itself."""

import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from jobspec import KINDS, SpecError, load_spec
from jobspec.checks import check_values
from jobspec.loading import Origins
from jobspec.pipeline_file import load_pipeline
from jobspec.schema import numeric_keys

REPO = Path(__file__).resolve().parents[1]
PRETRAIN = str(REPO / "jobs" / "pretrain.yaml")


def refused(path: str, *overrides: str, launch: bool = True) -> str:
    with pytest.raises(SpecError) as e:
        load_spec(path, list(overrides), launch=launch)
    return str(e.value)


def write(tmp_path: Path, text: str, name: str = "job.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# ---------------------------------------------------------------- names: a newline must not reach a batch script


def test_a_pipeline_name_from_a_block_scalar_is_refused(tmp_path):
    """`name: |` ends the name with a newline, which '$' let through; the job name then split the batch script."""
    path = write(tmp_path, f"kind: pipeline\nname: |\n  demo\nstages:\n  pretrain: {{job: {PRETRAIN}}}\n", "pipe.yaml")
    with pytest.raises(SpecError) as e:
        load_pipeline(path)
    assert "line 2" in str(e.value) and "key 'name'" in str(e.value) and "'demo\\n'" in str(e.value)


def test_a_stage_name_with_a_trailing_newline_is_refused(tmp_path):
    path = write(tmp_path, f'kind: pipeline\nname: demo\nstages:\n  "pre\\n": {{job: {PRETRAIN}}}\n', "pipe.yaml")
    with pytest.raises(SpecError, match="stage name 'pre\\\\n'"):
        load_pipeline(path)


@pytest.mark.parametrize(
    "override, env, key",
    [
        ("name=${oc.env:ORCH_TEST_VALUE}", "demo\n", "name"),
        ("resources.partition=${oc.env:ORCH_TEST_VALUE}", "gpu\n", "resources.partition"),
        ("optim.lr=${oc.env:ORCH_TEST_VALUE}", "nan", "optim.lr"),
        ("train.max_steps=${oc.env:ORCH_TEST_VALUE}", "100000000000000000000", "train.max_steps"),
    ],
)
def test_values_are_checked_after_interpolation(monkeypatch, override, env, key):
    monkeypatch.setenv("ORCH_TEST_VALUE", env)
    msg = refused(PRETRAIN, override)
    assert f"key '{key}'" in msg and f"command line override {override!r}" in msg, msg


def test_a_name_longer_than_100_characters_is_refused():
    assert "at most 100 characters" in refused(PRETRAIN, "name=" + "a" * 300)
    load_spec(PRETRAIN, ["name=" + "a" * 100])


# ---------------------------------------------------------------- numeric ranges, declared once in the schema


def test_every_numeric_key_of_every_kind_declares_its_range_and_its_default_is_in_it():
    for kind, schema in KINDS.items():
        defaults = load_spec(str(REPO / "jobs" / f"{kind}.yaml"))
        for key, allowed, nullable in numeric_keys(schema):
            assert allowed is not None, f"{kind}: {key} declares no range (jobspec/schema.py `bounded`)"
            value = OmegaConf.select(defaults, key)
            for v in value if OmegaConf.is_list(value) else [value]:
                assert (v is None and nullable) or v in allowed, (kind, key, v)


def _outside(allowed) -> list:
    """Integers just outside a range (integers: an int key takes them too)."""
    values = []
    if allowed.ge is not None:
        values.append(int(allowed.ge) - 1)
    if allowed.gt is not None:
        values.append(int(allowed.gt))
    if allowed.le is not None:
        values.append(int(allowed.le) + 1)
    if allowed.lt is not None:
        values.append(int(allowed.lt))
    return values


def test_a_value_just_outside_each_range_is_refused_naming_key_and_value():
    """Generated from the schema, on each kind's loaded job (load_spec ends with check_values): a key added with
    a range is covered here without a new line."""
    seen = set()
    for kind in KINDS:
        job = str(REPO / "jobs" / f"{kind}.yaml")
        cfg = load_spec(job)
        for key, allowed, _ in numeric_keys(KINDS[kind]):
            if key in seen:
                continue
            seen.add(key)
            original = OmegaConf.select(cfg, key)
            is_list = OmegaConf.is_list(original)
            original = list(original) if is_list else original  # a copy: update() writes into the list node
            for v in _outside(allowed):
                OmegaConf.update(cfg, key, [v] if is_list else v)
                with pytest.raises(SpecError) as e:
                    check_values(cfg, Origins(job, {}))
                shown = f"{key}[0]" if is_list else key
                assert f"key '{shown}' has the value {v}" in str(e.value) and f"must be {allowed}" in str(e.value)
            OmegaConf.update(cfg, key, original)
    assert len(seen) > 100


@pytest.mark.parametrize(
    "override, needle",
    [
        ("optim.lr=-1", "must be positive"),
        ("optim.lr=0", "must be positive"),
        ("optim.beta1=2", "in [0, 1)"),
        ("optim.eps=-1", "positive"),
        ("optim.min_lr_ratio=5", "in [0, 1]"),
        ("optim.grad_clip=-1", "0 or more"),
        ("optim.warmup_steps=-5", "0 or more"),
        ("optim.weight_decay=-3", "0 or more"),
        ("model.rope_theta=0", "positive"),
        ("model.norm_eps=-1", "positive"),
        ("model.init_std=-1", "positive"),
        ("model.ffn_hidden=-8", "at least 1, or null"),
        ("model.vocab_size=0", "at least 1, or null"),
        ("train.time_budget_min=-5", "positive, or null (null = no budget)"),
        ("train.time_budget_min=0", "positive"),
        ("data.max_docs=-3", "at least 1, or null"),
        ("seed=-1", "in [0, 4294967295]"),
        ("optim.lr=inf", "not a finite number"),
        ("optim.lr=nan", "not a finite number"),
        ("data.sources=[]", "at least one source"),
    ],
)
def test_the_values_orch_config_accepted_are_refused(override, needle):
    msg = refused(PRETRAIN, override)
    key = override.split("=")[0]
    assert f"command line override {override!r}: key '{key}'" in msg and needle in msg, msg


def run_orch(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(REPO), "ORCH_HOME": str(tmp_path / ".orch"), "PATH": "/usr/bin:/bin"},
    )


@pytest.mark.parametrize("command", ["config", "submit"])
def test_orch_config_and_submit_exit_2_on_a_range(tmp_path, command):
    result = run_orch(tmp_path, command, PRETRAIN, "optim.beta1=2", "executor=local")
    assert result.returncode == 2, result.stderr
    assert "key 'optim.beta1' has the value 2.0, but it must be in [0, 1)" in result.stderr
    assert result.stderr.count("\n") == 1, "one paragraph, no traceback"
    assert not (tmp_path / "runs").exists() and not (tmp_path / ".orch").exists(), "nothing registered"


# ---------------------------------------------------------------- YAML that expands or nests without end


def test_an_alias_bomb_is_refused_at_once(tmp_path):
    lines = ["kind: pretrain", "a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    lines += [f"{c}: &{c} [{', '.join([f'*{p}'] * 10)}]" for p, c in zip("abcdef", "bcdefg")]
    path = write(tmp_path, "\n".join(lines) + "\n")  # 8 lines, 10**7 values once expanded
    start = time.perf_counter()
    msg = refused(path)
    assert time.perf_counter() - start < 0.5
    assert "aliases (*name) expand to" in msg and msg.startswith(path)


def test_shared_sections_through_aliases_still_load(tmp_path):
    path = write(
        tmp_path,
        "kind: pretrain\ntrain: &t {max_steps: 5}\nresources: {sbatch_extra: &x [--exclusive]}\n"
        "data: {sources: [demo]}\n",
    )
    assert load_spec(path).train.max_steps == 5


@pytest.mark.parametrize(
    "text, needle",
    [
        ("kind: pretrain\nmodel: &m {n_layer: 2, x: *m}\n", "alias to itself"),
        ("kind: pretrain\nx: " + "[" * 1000 + "]" * 1000 + "\n", "nested too deeply"),
    ],
)
def test_yaml_that_never_ends_is_refused(tmp_path, text, needle):
    assert needle in refused(write(tmp_path, text))


# ---------------------------------------------------------------- sbatch_extra


@pytest.mark.parametrize(
    "flag, setter",
    [
        ("--dependency=singleton", "a pipeline stage's 'after' key"),
        ("--dep=singleton", "which sbatch reads as --dependency"),
        ("--signal=USR1@10", "resources.time_min"),
        ("--open-mode=truncate", "every start of a job appends to its logs"),
        ("--job-name=other", "the run id, from name"),
        ("--time=5", "resources.time_min"),
        ("--no-requeue", "resources.max_requeues"),
        ("--ntasks=3", "resources.nodes x resources.nproc_per_node"),
    ],
)
def test_sbatch_extra_cannot_replace_what_orch_sets(flag, setter):
    msg = refused(PRETRAIN, f"resources.sbatch_extra=[--exclusive,{flag}]")
    assert f"key 'resources.sbatch_extra[1]' has the value {flag!r}" in msg and setter in msg, msg


def test_sbatch_extra_still_takes_other_options():
    flags = ["--exclusive", "--reservation=r1", "--gpus=2", "--nodelist=node1", "--time-min=5"]
    cfg = load_spec(PRETRAIN, [f"resources.sbatch_extra=[{','.join(flags)}]"])
    assert list(cfg.resources.sbatch_extra) == flags


# ---------------------------------------------------------------- what the command line says


@pytest.mark.parametrize(
    "override, needle",
    [
        ("data.sources=/x", "key 'data.sources' has the value '/x', but it must be a list"),
        ("model=3", "key 'model' has the value 3, but 'model' is a section"),
        ("train.max_steps=[1]", "takes a single value"),
        ("data.sources=[[a]]", "each of its entries must be a single value"),
    ],
)
def test_a_value_of_the_wrong_shape_is_named_in_our_words(override, needle):
    msg = refused(PRETRAIN, override)
    assert needle in msg and "Node" not in msg and "ListConfig" not in msg, msg


def test_a_command_line_override_is_blamed_not_the_file_line_it_conflicts_with():
    msg = refused(PRETRAIN, "model.n_head=3")
    assert msg.startswith("command line override 'model.n_head=3': key 'model.d_model'"), msg


def test_every_shipped_job_and_pipeline_file_loads(tmp_path):
    from orchestrator import run_names
    from orchestrator.registry import Registry, Run

    # The post-training files start from runs by name (pretrain, sft): a registry where each has a COMPLETED run
    registry = Registry(tmp_path / "registry.db")
    for name in ("pretrain", "sft"):
        step = tmp_path / "runs" / f"{name}-000001" / "checkpoints" / "step_00000001"
        step.mkdir(parents=True)
        (step / "manifest.json").write_text('{"files": {}}')
        registry.add(Run(f"{name}-000001", name, name, "local", "COMPLETED", str(step.parent.parent), 1.0))
    find_run = run_names.finder(registry)
    files = sorted((REPO / "jobs").glob("*.yaml"))
    assert len(files) >= 10
    for path in files:
        kind = yaml.safe_load(path.read_text()).get("kind")
        if kind == "pipeline":
            assert load_pipeline(str(path), find_run=find_run).stages
        elif kind in KINDS:  # other kinds of files (a sweep's) have their own loaders
            load_spec(str(path), launch=True, find_run=find_run)


def test_the_refused_options_are_every_one_orch_writes_in_a_batch_script(tmp_path):
    """ORCH_SBATCH_OPTIONS against what orchestrator/executors/slurm.py and slurm_array.py really write."""
    from submitit.slurm.slurm import _make_sbatch_string

    from jobspec.checks import ORCH_SBATCH_OPTIONS
    from orchestrator.executors import slurm, slurm_array
    from orchestrator.registry import Run

    cfg = load_spec(
        PRETRAIN,
        [
            "resources.gpus_per_node=1",
            "resources.mem_gb=8",
            "resources.partition=p",
            "resources.account=a",
            "resources.qos=q",
            "resources.constraint=c",
        ],
    )
    run = Run(
        id="pretrain-abc123",
        name="pretrain",
        kind="pretrain",
        executor="slurm",
        state="PENDING",
        run_dir=str(tmp_path / "run"),
        created_at=0.0,
    )
    params = slurm.executor_parameters(run, cfg.resources, dependency_job_ids=["11"])
    scripts = [
        _make_sbatch_string(command="true", folder=tmp_path, **params),
        _make_sbatch_string(
            command="true",
            folder=tmp_path,
            map_count=4,  # a data job's array step
            **slurm_array.array_parameters(params, run, "analyze"),
        ),
    ]
    written = {
        line.split()[1][2:].split("=")[0]
        for script in scripts
        for line in script.splitlines()
        if line.startswith("#SBATCH --")
    }
    assert "dependency" in written and "array" in written and "signal" in written
    assert written - {"wckey"} <= set(ORCH_SBATCH_OPTIONS), written - set(ORCH_SBATCH_OPTIONS)  # wckey: a label
