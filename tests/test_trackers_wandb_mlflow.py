"""W&B (offline, its files in the run folder) and MLflow (its local file store): a run killed after its last
checkpoint and resumed continues the same tracker run, each step sent once with metrics.jsonl's values, the
resolved config as hyperparameters and the pipeline id as the group; read back with each tool's own record
types (W&B's protobuf records of its .wandb file, MLflow's MlflowClient). `orch sync` builds `wandb sync`."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import env_for

from tests.test_observability import jsonl_values, train

pytest.importorskip("wandb")
pytest.importorskip("mlflow")


def wandb_records(run_dir: Path) -> list:
    """Every record of the run's .wandb files, oldest attempt first, as W&B's own protobuf Records. The file is
    LevelDB's log format (W&B's `datastore`): a 7-byte header, then 32 KiB blocks of chunks, each with a 7-byte
    header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2

    records = []
    for path in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        data, pos, pieces = path.read_bytes(), 7, b""
        assert data[:4] == b":W&B", path
        while pos + 7 <= len(data):
            left = 32768 - pos % 32768
            _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
            if left < 7 or (length == 0 and kind == 0):
                pos += left  # the block's padding
                continue
            if pos + 7 + length > len(data):
                break  # a chunk the kill cut short
            chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
            pieces = chunk if kind in (1, 2) else pieces + chunk
            if kind in (1, 4):
                record = wandb_internal_pb2.Record()
                record.ParseFromString(pieces)
                records.append((path.parent.name, record))
    return records


def wandb_history(run_dir: Path) -> list[tuple[int, dict]]:
    rows = []
    for _, record in wandb_records(run_dir):
        if record.WhichOneof("record_type") == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            rows.append((items["_step"], {k: v for k, v in items.items() if not k.startswith("_")}))
    return rows


def mlflow_client(run_dir: Path, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3's opt-in to reading its file store
    return MlflowClient(tracking_uri=(run_dir.parent / "mlruns").as_uri())


@pytest.mark.slow
def test_a_killed_and_resumed_run_continues_one_wandb_and_one_mlflow_run(tmp_path, tiny_data, monkeypatch):
    run = tmp_path / "run"
    backends = ("logging.backends=[jsonl,wandb,mlflow]", "logging.group=demo-abc123", "train.val_every=4")
    killed = train(run, tiny_data, *backends, fault="train.after_optimizer_step#10:kill")  # after step 8's save
    assert killed.returncode != 0
    ids = json.loads((run / "trackers.json").read_text())
    assert ids["mlflow"]["logged_step"] == 9  # step 9 was logged, then the kill came inside step 10
    resumed = train(run, tiny_data, *backends)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout
    assert json.loads((run / "trackers.json").read_text())["wandb"]["run_id"] == ids["wandb"]["run_id"]
    losses, val_losses = jsonl_values(run, "loss"), jsonl_values(run, "val_loss")
    assert sorted(val_losses) == [4, 8, 12]

    # W&B: two attempts' folders, one run id, the pipeline's group, the config; each step once across them
    # (the killed attempt's file may hold nothing at all: W&B's service writes it through a buffer the kill discards)
    assert len(list((run / "wandb").glob("offline-run-*"))) == 2
    runs = [(folder, r.run) for folder, r in wandb_records(run) if r.WhichOneof("record_type") == "run"]
    assert {r.run_id for _, r in runs} == {ids["wandb"]["run_id"]} and {r.run_group for _, r in runs} == {"demo-abc123"}
    config = {item.key: json.loads(item.value_json) for item in runs[0][1].config.update}
    assert config["train"]["max_steps"] == 12 and config["logging"]["group"] == "demo-abc123"
    history = wandb_history(run)
    steps = [step for step, _ in history]
    assert steps == sorted(set(steps)) == list(range(1, 13)), steps
    rows = dict(history)
    assert [rows[s]["loss"] for s in steps] == pytest.approx([losses[s] for s in steps], rel=1e-6)
    assert {s: rows[s]["val_loss"] for s in val_losses} == pytest.approx(val_losses, rel=1e-6)

    # MLflow: one run (the same id across attempts) under the pipeline's parent run; each step once
    client = mlflow_client(run, monkeypatch)
    experiment = client.get_experiment_by_name("orch").experiment_id
    found = client.search_runs([experiment], filter_string="tags.`orch.pipeline` = 'demo-abc123'")
    parent = next(r for r in found if r.data.tags.get("orch.role") == "pipeline")
    child = next(r for r in found if r.info.run_id == ids["mlflow"]["run_id"])
    assert len(found) == 2 and child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert child.info.status == "FINISHED" and child.data.params["train.max_steps"] == "12"
    loss = [(m.step, m.value) for m in client.get_metric_history(child.info.run_id, "loss")]
    assert [s for s, _ in loss] == list(range(1, 13))
    assert [v for _, v in loss] == pytest.approx([losses[s] for s in range(1, 13)], rel=1e-6)
    val = {m.step: m.value for m in client.get_metric_history(child.info.run_id, "val_loss")}
    assert val == pytest.approx(val_losses, rel=1e-6)


def test_steps_an_earlier_attempt_never_sent_are_caught_up_from_metrics_jsonl(tmp_path, monkeypatch):
    """An attempt killed between metrics.jsonl and the tracker (step 4), resumed from step 2's checkpoint: steps 3
    and 4 are recomputed, 3 is not sent again, 4 is; then the resumed attempt starting past a step its
    predecessor logged only to metrics.jsonl (6) sends that step from the file."""
    from training.tracker_mlflow import MlflowTracker

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    run = tmp_path / "run"
    run.mkdir()
    config = {"train": {"max_steps": 8}, "logging": {"group": None}}

    def attempt(steps: range, sent: range, offset: float) -> None:
        tracker = MlflowTracker(run, config, None)
        with (run / "metrics.jsonl").open("a") as f:
            for step in steps:
                record = {"time": time.time(), "step": step, "loss": step + offset}
                f.write(json.dumps(record) + "\n")
                if step in sent:
                    tracker.log(record)
        # no close: the attempt was killed

    attempt(range(1, 5), range(1, 4), 0.0)  # step 4 reached metrics.jsonl only
    attempt(range(3, 7), range(3, 6), 0.5)  # resumed from step 2; step 6 reached metrics.jsonl only
    attempt(range(7, 9), range(7, 9), 0.0)  # resumed from step 6
    client = mlflow_client(run, monkeypatch)
    run_id = json.loads((run / "trackers.json").read_text())["mlflow"]["run_id"]
    history = [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")]
    assert history == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.5), (5, 5.5), (6, 6.5), (7, 7.0), (8, 8.0)]


def orch(tmp_path: Path, *args: str, prelude: str = "pass") -> subprocess.CompletedProcess:
    code = f"import sys; {prelude}; from orchestrator.cli import main; main(sys.argv[1:])"
    return subprocess.run(
        [sys.executable, "-c", code, *args], cwd=tmp_path, env=env_for(tmp_path), capture_output=True, text=True
    )


def test_orch_sync_runs_wandb_sync_on_each_attempt_and_refuses_clearly(tmp_path):
    run = tmp_path / "run"
    nothing = orch(tmp_path, "sync", str(tmp_path))
    assert nothing.returncode == 2 and "no offline W&B run" in nothing.stderr
    for started in ("20261207_101500-ab12", "20261207_093000-ab12"):  # two attempts of one run, as wandb names them
        (run / "wandb" / f"offline-run-{started}").mkdir(parents=True)
    (run / "wandb" / "latest-run").symlink_to(run / "wandb" / "offline-run-20261207_101500-ab12")
    dry = orch(tmp_path, "sync", str(run), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.split() == [
        sys.executable,
        "-m",
        "wandb",
        "sync",
        str(run / "wandb" / "offline-run-20261207_093000-ab12"),
        str(run / "wandb" / "offline-run-20261207_101500-ab12"),
    ]
    # sys.modules[name] = None is how Python hides an installed package (import and find_spec both miss it)
    missing = orch(tmp_path, "sync", str(run), prelude="sys.modules['wandb'] = None")
    assert missing.returncode == 2
    assert "wandb package is not installed" in missing.stderr and "orch[wandb]" in missing.stderr


def test_an_eval_jobs_metrics_and_config_reach_mlflow(tmp_path, monkeypatch):
    from training.trackers import log_results

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    run = tmp_path / "eval-run"
    run.mkdir()
    metrics = {"pretrain/val/bpb": 1.27, "sft/humaneval/passes": 0.25, "sft/humaneval/n": 164}
    config = "kind: eval\neval:\n  tasks: [humaneval]\nlogging:\n  group: demo-1\n"
    log_results(run, ["jsonl", "mlflow"], config, metrics)
    client = mlflow_client(run, monkeypatch)
    logged = client.get_run(json.loads((run / "trackers.json").read_text())["mlflow"]["run_id"])
    assert logged.data.metrics == metrics and logged.data.params["eval.tasks"] == '["humaneval"]'
    assert logged.data.tags["orch.pipeline"] == "demo-1"


@pytest.mark.slow
def test_a_pipelines_stages_share_its_id_as_their_tracker_group(tmp_path, tiny_data):
    from omegaconf import OmegaConf

    from tests.test_pipeline import PRETRAIN, registry, submitted_ids, tiny_pipeline_overrides, write_pipeline
    from tests.test_pipeline import orch as orch_cli

    stages = {"a": {"job": PRETRAIN, "overrides": ["train.max_steps=1"]}, "b": {"job": PRETRAIN, "after": "a"}}
    path = write_pipeline(tmp_path, stages, overrides=tiny_pipeline_overrides(tmp_path, tiny_data))
    result = orch_cli(tmp_path, "submit", str(path))
    assert result.returncode == 0, result.stderr
    pipeline_id, ids = submitted_ids(result.stdout)
    try:
        for run_id in ids.values():
            config = OmegaConf.load(Path(registry(tmp_path).get(run_id).run_dir) / "config.yaml")
            assert config.logging.group == pipeline_id
    finally:
        assert orch_cli(tmp_path, "pipeline", "cancel", pipeline_id).returncode == 0
        orch_cli(tmp_path, "pipeline", "wait", pipeline_id, "--timeout", "120")
