"""Pipelines: checked before anything registers, stages run in order from their parent's final checkpoint,
and a failed stage cancels what depends on it, on this machine and on the real local Slurm cluster."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from orchestrator.registry import Registry
from tests.conftest import REPO, TINY, env_for
from tests.test_slurm_cluster import slurm_cluster  # noqa: F401  (a fixture)

PRETRAIN = str(REPO / "jobs" / "pretrain.yaml")


def orch(tmp_path, *args, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args],
        cwd=tmp_path,
        env=env_for(tmp_path),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def write_pipeline(tmp_path, stages: dict, overrides=(), name="tiny", executor="local") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        yaml.safe_dump(
            {"kind": "pipeline", "name": name, "executor": executor, "overrides": list(overrides), "stages": stages},
            sort_keys=False,
        )
    )
    return path


def tiny_pipeline_overrides(tmp_path, data_dir) -> list[str]:
    # every stage: the tiny model on the shared tiny data, its run folder under tmp_path, no retries
    return [*TINY, f"data.dir={data_dir}", f"runs_dir={tmp_path / 'runs'}", "resources.max_retries=0"]


def registry(tmp_path) -> Registry:
    return Registry(tmp_path / ".orch" / "registry.db")


def submitted_ids(stdout: str) -> tuple[str, dict[str, str]]:
    """'submitted pipeline P (...)' then '  stage: run-id ...' lines -> (P, {stage: run id})."""
    lines = stdout.splitlines()
    pipeline_id = lines[0].split()[2]
    stages = {}
    for line in lines[1:]:
        if line.startswith("  ") and ": " in line and not line.strip().startswith("follow"):
            stage, rest = line.strip().split(": ", 1)
            stages[stage] = rest.split()[0]
    return pipeline_id, stages


def wait_until(predicate, timeout: float, what: str, interval: float = 0.25):
    """Poll real state (files, registry rows, squeue) until `predicate` is truthy; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f}s waiting for {what}"
        time.sleep(interval)
    return value


def final_weights(run_dir: str) -> dict[str, torch.Tensor]:
    """The model tensors of a run's newest checkpoint, read from its safetensors files."""
    step = sorted((Path(run_dir) / "checkpoints").glob("step_*"))[-1]
    tensors = {}
    for f in sorted((step / "model").glob("*.safetensors")):
        tensors.update(load_file(f))
    assert tensors, f"no tensors in {step}"
    return tensors


# ------------------------------------------------------------------ validation: exit 2, nothing registered


BAD = {
    "cycle": (
        {
            "a": {"job": PRETRAIN, "after": "c"},
            "b": {"job": PRETRAIN, "after": "a"},
            "c": {"job": PRETRAIN, "after": "b"},
        },
        ["cycle", "'after'", "a -> b -> c -> a"],
    ),
    "unknown_after": (
        {"pretrain": {"job": PRETRAIN}, "sft": {"job": PRETRAIN, "after": "pretrian"}},
        ["stages.sft.after", "'pretrian'", "Did you mean 'pretrain'?"],
    ),
    "missing_job": (
        {"pretrain": {"job": PRETRAIN}, "sft": {"job": "no-such-job.yaml", "after": "pretrain"}},
        ["stages.sft.job", "'no-such-job.yaml'", "no such job file"],
    ),
    "bad_stage_job": (
        {"pretrain": {"job": PRETRAIN, "overrides": ["train.max_stepz=3"]}},
        ["stage 'pretrain'", "train.max_stepz", "Did you mean 'train.max_steps'?"],
    ),
    "unknown_stage_key": (
        {"pretrain": {"job": PRETRAIN, "afterr": "x"}},
        ["stages.pretrain.afterr", "Did you mean 'after'?"],
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_pipeline_exits_2_and_registers_nothing(tmp_path, case):
    stages, expected = BAD[case]
    path = write_pipeline(tmp_path, stages)
    result = orch(tmp_path, "submit", str(path))
    assert result.returncode == 2, result.stderr
    error = result.stderr.strip()
    assert error.startswith(f"error: {path}"), error
    assert len(error.splitlines()) == 1, "one paragraph"
    for needle in expected:
        assert needle in error, (needle, error)
    assert registry(tmp_path).list() == []
    assert not (tmp_path / "runs").exists()


def test_an_override_for_an_unknown_stage_is_refused(tmp_path):
    path = write_pipeline(tmp_path, {"pretrain": {"job": PRETRAIN}})
    result = orch(tmp_path, "submit", str(path), "stages.pretrian.train.max_steps=3")
    assert result.returncode == 2
    assert "stage 'pretrian' is not in this pipeline" in result.stderr and "Did you mean 'pretrain'?" in result.stderr
    assert registry(tmp_path).list() == []


def test_the_shipped_pipelines_load(tmp_path):
    """jobs/pipeline-pretrain-chain.yaml resolves; jobs/pipeline.yaml names only stages whose job files exist
    or says which one is missing, and its pretrain stage reads the data stage's corpus."""
    result = orch(tmp_path, "config", str(REPO / "jobs" / "pipeline-pretrain-chain.yaml"), "train.max_steps=7")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("# ---- stage") == 4 and result.stdout.count("max_steps: 7") == 4
    result = orch(tmp_path, "config", str(REPO / "jobs" / "pipeline.yaml"))
    missing = [k for k in ("sft", "dpo", "grpo", "eval") if not (REPO / "jobs" / f"{k}.yaml").exists()]
    if missing:
        assert result.returncode == 2 and f"stages.{missing[0]}.job" in result.stderr, result.stderr
    else:
        assert result.returncode == 0, result.stderr
        assert result.stdout.count("# ---- stage") == 6  # data, pretrain, sft, dpo, grpo, eval
        assert "# ---- stage pretrain" in result.stdout and "(after data: data.sources = its corpus)" in result.stdout


# ------------------------------------------------------------------ the local executor


def register_chain(reg: Registry, tmp_path, pipeline_id: str, states: dict[str, str], created_at: float):
    """Registry rows for a chain of stages (no processes): stage -> state, each after the one before."""
    from orchestrator.registry import Run

    parent = None
    for stage, state in states.items():
        run_id = f"{pipeline_id}-{stage}"
        reg.add(
            Run(
                id=run_id,
                name=stage,
                kind="pretrain",
                executor="local",
                state=state,
                run_dir=str(tmp_path / run_id),
                created_at=created_at,
                pipeline_id=pipeline_id,
                stage=stage,
                depends_on=parent,
            )
        )
        parent = run_id


def test_stages_after_a_failure_or_a_vanished_supervisor_are_cancelled(tmp_path):
    from orchestrator.dependencies import cancel_dependents
    from orchestrator.pipelines import reconcile as check_pipelines

    reg = registry(tmp_path)
    register_chain(reg, tmp_path, "p1", {"a": "COMPLETED", "b": "FAILED", "c": "PENDING", "d": "PENDING"}, time.time())
    cancelled = cancel_dependents(reg, reg.list(pipeline_id="p1"))
    assert [r.stage for r in cancelled] == ["c", "d"]
    assert {r.stage: (r.state, r.reason) for r in reg.list(pipeline_id="p1")}["d"] == (
        "CANCELLED",
        "dependency b failed",
    )  # named after the stage that failed, not its direct parent
    assert reg.get("p1-a").state == "COMPLETED"

    # a local pipeline whose supervisor is gone (no live pid) would leave its stages PENDING forever
    register_chain(reg, tmp_path, "p2", {"a": "COMPLETED", "b": "PENDING"}, time.time() - 3600)
    register_chain(reg, tmp_path, "p3", {"a": "PENDING"}, time.time())  # just submitted: left alone
    check_pipelines(reg)
    assert reg.get("p2-b").state == "CANCELLED" and "supervisor is gone" in reg.get("p2-b").reason
    assert reg.get("p3-a").state == "PENDING"
    assert reg.active_pipelines() == ["p3"]


def test_local_pipeline_runs_each_stage_from_its_parents_final_checkpoint(tmp_path, tiny_data):
    # b trains 0 steps: the checkpoint it saves must be exactly the weights it started from, a's last.
    path = write_pipeline(
        tmp_path,
        {
            "a": {"job": PRETRAIN, "overrides": ["train.max_steps=4"]},
            "b": {"job": PRETRAIN, "after": "a", "overrides": ["train.max_steps=0"]},
            "c": {"job": PRETRAIN, "after": "b", "overrides": ["train.max_steps=3"]},
        },
        overrides=tiny_pipeline_overrides(tmp_path, tiny_data),
    )
    result = orch(tmp_path, "submit", str(path))
    assert result.returncode == 0, result.stderr
    pipeline_id, ids = submitted_ids(result.stdout)
    assert list(ids) == ["a", "b", "c"]

    # every stage is registered up front, with its place in the chain
    runs = {r.stage: r for r in registry(tmp_path).list(pipeline_id=pipeline_id)}
    assert {s: r.id for s, r in runs.items()} == ids
    assert [runs[s].depends_on for s in "abc"] == [None, ids["a"], ids["b"]]
    assert runs["c"].state == "PENDING"

    result = orch(tmp_path, "pipeline", "wait", pipeline_id, "--timeout", "400")
    assert result.returncode == 0, result.stdout[-3000:]
    runs = {r.stage: r for r in registry(tmp_path).list(pipeline_id=pipeline_id)}
    assert {s: r.state for s, r in runs.items()} == dict.fromkeys("abc", "COMPLETED")
    for child, parent in (("b", "a"), ("c", "b")):
        log = (Path(runs[child].run_dir) / "logs" / "train.log").read_text()
        assert f"initialized weights from {runs[parent].run_dir}/checkpoints/step_" in log, log[-2000:]
        assert (Path(runs[child].run_dir) / "config.yaml").read_text().count(f"init_from: {runs[parent].run_dir}") == 1

    a, b, c = (final_weights(runs[s].run_dir) for s in "abc")
    assert (Path(runs["a"].run_dir) / "checkpoints" / "step_00000004").is_dir()
    assert (Path(runs["b"].run_dir) / "checkpoints" / "step_00000000").is_dir()
    assert b.keys() == a.keys()
    for name in a:
        assert torch.equal(b[name], a[name]), name
    assert any(not torch.equal(c[k], b[k]) for k in b), "c trained 3 steps: its weights must have moved"

    listing = orch(tmp_path, "runs").stdout.splitlines()
    header = listing[0].split()
    assert header[header.index("pipeline") + 1] == "stage"
    row = next(line.split() for line in listing if line.startswith(ids["c"]))
    assert "COMPLETED" in row and row[row.index(pipeline_id) + 1] == "c"


def test_a_failed_stage_cancels_its_dependents(tmp_path, tiny_data):
    # b asks for a model narrower than a's checkpoint: loading it fails at run time, not at submit time.
    path = write_pipeline(
        tmp_path,
        {
            "a": {"job": PRETRAIN},
            "b": {"job": PRETRAIN, "after": "a", "overrides": ["model.d_model=32"]},
            "c": {"job": PRETRAIN, "after": "b"},
            "d": {"job": PRETRAIN, "after": "c"},
        },
        overrides=[*tiny_pipeline_overrides(tmp_path, tiny_data), "train.max_steps=2"],
    )
    result = orch(tmp_path, "submit", str(path), "--follow")
    assert result.returncode == 1, result.stdout[-3000:]
    pipeline_id, _ = submitted_ids(result.stdout)
    runs = {r.stage: r for r in registry(tmp_path).list(pipeline_id=pipeline_id)}
    assert {s: r.state for s, r in runs.items()} == {
        "a": "COMPLETED",
        "b": "FAILED",
        "c": "CANCELLED",
        "d": "CANCELLED",
    }
    assert runs["c"].reason == runs["d"].reason == "dependency b failed"
    assert runs["c"].attempts == runs["d"].attempts == 0, "never started"
    assert not (Path(runs["c"].run_dir) / "logs" / "train.log").exists()
    assert "stage c" in result.stdout and "CANCELLED: dependency b failed" in result.stdout


def test_cancelling_a_pipeline_stops_the_running_stage_and_the_rest(tmp_path, tiny_data):
    path = write_pipeline(
        tmp_path,
        {
            "a": {"job": PRETRAIN, "overrides": ["train.max_steps=100000"]},
            "b": {"job": PRETRAIN, "after": "a"},
        },
        overrides=tiny_pipeline_overrides(tmp_path, tiny_data),
    )
    result = orch(tmp_path, "submit", str(path))
    assert result.returncode == 0, result.stderr
    pipeline_id, ids = submitted_ids(result.stdout)
    reg = registry(tmp_path)
    metrics = Path(reg.get(ids["a"]).run_dir) / "metrics.jsonl"
    wait_until(lambda: metrics.exists() and metrics.stat().st_size > 0, 120, "stage a to train")
    assert orch(tmp_path, "pipeline", "cancel", pipeline_id[:-2]).returncode == 0  # a prefix is enough
    assert orch(tmp_path, "pipeline", "wait", pipeline_id, "--timeout", "120").returncode == 1
    a, b = reg.get(ids["a"]), reg.get(ids["b"])
    assert a.state == b.state == "CANCELLED"
    assert b.reason == "pipeline cancelled by user" and b.attempts == 0
    assert list((Path(a.run_dir) / "checkpoints").glob("step_*/manifest.json")), "a saved on its way out"


# ------------------------------------------------------------------ the real local Slurm cluster


def squeue_jobs(job_ids) -> dict[str, tuple[str, str]]:
    """job id -> (state, dependency) for the jobs slurmctld still knows."""
    out = subprocess.run(
        ["squeue", "-h", "-t", "all", "-j", ",".join(job_ids), "-o", "%i|%T|%E"], capture_output=True, text=True
    ).stdout
    return {i: (state, dep) for i, state, dep in (line.split("|") for line in out.split())}


def sacct_state(job_id: str) -> str:
    """The job's state in the accounting database ("" until slurmdbd has it); "CANCELLED by 0" -> "CANCELLED"."""
    out = subprocess.run(
        ["sacct", "--parsable2", "-n", "-X", "-j", job_id, "-o", "State"], capture_output=True, text=True
    ).stdout.splitlines()
    return out[-1].split()[0] if out and out[-1].strip() else ""


def slurm_stages(tmp_path, pipeline_id) -> dict:
    return {r.stage: r for r in registry(tmp_path).list(pipeline_id=pipeline_id)}


@pytest.mark.slurm
def test_slurm_pipeline_queues_every_stage_with_dependencies_and_completes(slurm_cluster, tmp_path, tiny_data):  # noqa: F811  (the fixture, imported above)
    pytest.importorskip("orchestrator.executors.slurm")
    chain = REPO / "jobs" / "pipeline-pretrain-chain.yaml"
    result = orch(
        tmp_path,
        "submit",
        str(chain),
        "executor=slurm",
        *tiny_pipeline_overrides(tmp_path, tiny_data),
        "train.max_steps=2",
    )
    assert result.returncode == 0, result.stderr
    pipeline_id, ids = submitted_ids(result.stdout)
    stages = slurm_stages(tmp_path, pipeline_id)
    order = ["base", "more", "anneal", "cool"]
    assert list(ids) == order and all(stages[s].executor == "slurm" for s in order)
    jobs = [stages[s].slurm_job_id for s in order]
    queued = squeue_jobs(jobs)
    assert set(queued) == set(jobs), queued  # all four queued at once
    for parent, child in zip(jobs, jobs[1:]):
        state, dependency = queued[child]
        if state == "PENDING":  # (a child whose parent already finished has its dependency cleared)
            assert dependency.startswith(f"afterok:{parent}"), queued
    assert queued[jobs[-1]][0] == "PENDING" and queued[jobs[-2]][0] == "PENDING", queued

    result = orch(tmp_path, "pipeline", "wait", pipeline_id, "--timeout", "240", timeout=300)
    assert result.returncode == 0, result.stdout[-3000:]
    stages = slurm_stages(tmp_path, pipeline_id)
    assert {s: r.state for s, r in stages.items()} == dict.fromkeys(order, "COMPLETED")
    wait_until(lambda: all(sacct_state(j) == "COMPLETED" for j in jobs), 60, "sacct to report COMPLETED")
    for parent, child in zip(order, order[1:]):
        logs = "".join(p.read_text(errors="replace") for p in Path(stages[child].run_dir).glob("slurm/*_log.out"))
        assert f"initialized weights from {stages[parent].run_dir}/checkpoints/step_" in logs


@pytest.mark.slurm
def test_slurm_pipeline_cancels_the_dependents_of_a_failed_stage(slurm_cluster, tmp_path, tiny_data):  # noqa: F811  (the fixture, imported above)
    pytest.importorskip("orchestrator.executors.slurm")
    # a's init_from holds a committed checkpoint whose files are gone: submit's check (a manifest) passes, the
    # trainer's verification fails, at run time, on the cluster
    step = tmp_path / "damaged-run" / "checkpoints" / "step_00000001"
    step.mkdir(parents=True)
    (step / "manifest.json").write_text(json.dumps({"files": {"model/shard.safetensors": {"bytes": 10}}}))
    path = write_pipeline(
        tmp_path,
        {
            "a": {"job": PRETRAIN, "overrides": [f"checkpoint.init_from={tmp_path / 'damaged-run'}"]},
            "b": {"job": PRETRAIN, "after": "a"},
            "c": {"job": PRETRAIN, "after": "b"},
            "d": {"job": PRETRAIN, "after": "c"},
        },
        overrides=[*tiny_pipeline_overrides(tmp_path, tiny_data), "train.max_steps=2"],
        executor="slurm",
    )
    result = orch(tmp_path, "submit", str(path), "--follow", timeout=300)
    assert result.returncode == 1, result.stdout[-3000:]
    pipeline_id, _ = submitted_ids(result.stdout)
    stages = slurm_stages(tmp_path, pipeline_id)
    assert {s: r.state for s, r in stages.items()} == {
        "a": "FAILED",
        "b": "CANCELLED",
        "c": "CANCELLED",
        "d": "CANCELLED",
    }
    assert "damaged-run" in stages["a"].reason
    assert stages["b"].reason == stages["c"].reason == stages["d"].reason == "dependency a failed"
    cancelled = [stages[s].slurm_job_id for s in "bcd"]
    # scancelled, not left PENDING (b with DependencyNeverSatisfied, c and d behind it)
    assert not [j for j, (state, _) in squeue_jobs(cancelled).items() if state == "PENDING"]
    wait_until(lambda: all(sacct_state(j) == "CANCELLED" for j in cancelled), 60, "sacct to report CANCELLED")


@pytest.mark.slurm
def test_cancelling_a_slurm_pipeline_scancels_every_stage_and_waits_for_slurm(slurm_cluster, tmp_path, tiny_data):  # noqa: F811  (the fixture, imported above)
    pytest.importorskip("orchestrator.executors.slurm")
    path = write_pipeline(
        tmp_path,
        {
            "a": {"job": PRETRAIN, "overrides": ["train.max_steps=100000"]},  # still pending or training when cancelled
            "b": {"job": PRETRAIN, "after": "a"},
            "c": {"job": PRETRAIN, "after": "b"},
        },
        overrides=[*tiny_pipeline_overrides(tmp_path, tiny_data), "train.max_steps=2"],
        executor="slurm",
    )
    result = orch(tmp_path, "submit", str(path))
    assert result.returncode == 0, result.stderr
    pipeline_id, _ = submitted_ids(result.stdout)
    jobs = {s: r.slurm_job_id for s, r in slurm_stages(tmp_path, pipeline_id).items()}
    assert len(jobs) == 3 and all(jobs.values())

    result = orch(tmp_path, "pipeline", "cancel", pipeline_id)
    assert result.returncode == 0, result.stderr
    # every stage was handed to Slurm (scancel), and none shows CANCELLED before Slurm says its job ended
    stages = slurm_stages(tmp_path, pipeline_id)
    assert {s: r.state for s, r in stages.items()} == dict.fromkeys("abc", "CANCELLING"), result.stdout
    assert {r.reason for r in stages.values()} == {"pipeline cancelled by user"}
    wait_until(
        lambda: (
            not [
                j
                for j, (state, _) in squeue_jobs(list(jobs.values())).items()
                if state in ("PENDING", "RUNNING", "CONFIGURING", "REQUEUED")
            ]
        ),
        60,
        "Slurm to end the pipeline's jobs",
    )

    result = orch(tmp_path, "pipeline", "wait", pipeline_id, "--timeout", "120", timeout=180)
    assert result.returncode == 1, result.stdout[-3000:]
    stages = slurm_stages(tmp_path, pipeline_id)
    assert {s: r.state for s, r in stages.items()} == dict.fromkeys("abc", "CANCELLED")
    assert {r.reason for r in stages.values()} == {"pipeline cancelled by user"}
    assert stages["b"].attempts == stages["c"].attempts == 0, "never started"
    wait_until(lambda: all(sacct_state(j) == "CANCELLED" for j in jobs.values()), 60, "sacct to report CANCELLED")
