"""End to end on the CPU: `orch submit` a tiny pretrain, watch it finish, check what it left on disk."""

import json
import subprocess
import sys
from pathlib import Path

from safetensors import safe_open

from tests.conftest import REPO, env_for, tiny_overrides


def test_tiny_pretrain_through_orch_submit(tmp_path, tiny_data):
    args = [
        sys.executable,
        "-m",
        "orchestrator.cli",
        "submit",
        str(REPO / "jobs" / "pretrain.yaml"),
        *tiny_overrides(
            tiny_data,
            "train.max_steps=60",
            "checkpoint.every=30",
            "name=tiny",
            f"runs_dir={tmp_path / 'runs'}",
            "executor=local",  # the job file says auto: Slurm where a cluster answers, as on this test machine
        ),
        "--follow",
    ]
    result = subprocess.run(args, cwd=tmp_path, env=env_for(tmp_path), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "COMPLETED" in result.stdout

    run_dirs = [p for p in (tmp_path / "runs").iterdir() if p.name != ".code"]  # .code: the code snapshots
    assert len(run_dirs) == 1 and run_dirs[0].name.startswith("tiny-")
    run_dir = run_dirs[0]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < losses[0] - 1.0, losses  # nats per token; the start is about ln(512) = 6.2
    assert all(r["tokens_per_s"] > 0 for r in records if "loss" in r)
    val = [r for r in records if "val_bpb" in r]
    assert val and 0 < val[-1]["val_bpb"] < 8

    # The final checkpoint is plain safetensors: readable without torch.load, without orch.
    ckpts = sorted((run_dir / "checkpoints").iterdir())
    assert [c.name for c in ckpts] == ["step_00000030", "step_00000060"]
    shards = list((ckpts[-1] / "model").glob("*.safetensors"))
    assert shards
    names = set()
    for shard in shards:
        with safe_open(str(shard), framework="pt") as f:
            names.update(f.keys())
            for key in f.keys():
                assert f.get_tensor(key).isfinite().all()
    assert "tok_embeddings.weight" in names and "layers.1.feed_forward.w2.weight" in names
    state = json.loads((ckpts[-1] / "trainer_state.json").read_text())
    assert state["step"] == 60 and state["tokens_seen"] == 60 * 8 * 64
    summary = json.loads((run_dir / "summary.json").read_text())
    assert Path(summary["checkpoint"]) == ckpts[-1]

    runs = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "runs"],
        cwd=tmp_path,
        env=env_for(tmp_path),
        capture_output=True,
        text=True,
    )
    assert run_dir.name in runs.stdout and "COMPLETED" in runs.stdout


def test_export_then_start_a_job_from_the_hugging_face_folder(tmp_path, tiny_data):
    """`orch export` writes a Llama folder; a job with checkpoint.init_from=<that folder> starts
    from those weights: its first validation loss equals the source run's last one."""
    job = str(REPO / "jobs" / "pretrain.yaml")
    common = tiny_overrides(tiny_data, "train.val_every=0")
    source = tmp_path / "source"
    first = subprocess.run(
        [sys.executable, "-m", "training.main", job, *common, "train.max_steps=20", "--run-dir", str(source)],
        cwd=tmp_path,
        env=env_for(tmp_path),
        capture_output=True,
        text=True,
    )
    assert first.returncode == 0, first.stderr[-3000:]
    export = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "export", str(source), "--hf", str(tmp_path / "hf")],
        cwd=tmp_path,
        env=env_for(tmp_path),
        capture_output=True,
        text=True,
    )
    assert export.returncode == 0, export.stderr
    assert (tmp_path / "hf" / "config.json").is_file() and (tmp_path / "hf" / "model.safetensors").is_file()
    second = subprocess.run(
        [
            sys.executable,
            "-m",
            "training.main",
            job,
            *common,
            "train.max_steps=0",
            f"checkpoint.init_from={tmp_path / 'hf'}",
            "--run-dir",
            str(tmp_path / "second"),
        ],
        cwd=tmp_path,
        env=env_for(tmp_path),
        capture_output=True,
        text=True,
    )
    assert second.returncode == 0, second.stderr[-3000:]
    assert "initialized weights from the Hugging Face folder" in second.stdout

    def last_val(run):
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [r for r in records if "val_loss" in r][-1]["val_loss"]

    assert last_val(tmp_path / "second") == last_val(source)
