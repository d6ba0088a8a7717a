"""The default pipeline end to end: `orch submit jobs/pipeline.yaml --follow` runs data -> pretrain -> sft -> dpo ->
grpo -> eval on this machine: pretrain reads the data stage's cleaned corpus, each later stage starts from its
parent's final checkpoint, and the eval stage's report.md compares every model stage. Tiny model, few steps per
stage: the point is that the stages fit together (corpus, shapes, tokenizer, init_from chain, eval.compare), not
what they learn."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

from orchestrator.registry import Registry, Run
from tests.conftest import REPO, TINY, env_for

STAGES = ["pretrain", "sft", "dpo", "grpo"]
# Post-training rows hold a prompt and its answer: 128 tokens keep enough of the demo SFT examples and DPO
# pairs (64 keeps too few). The model's rotary tables are set that long from pretraining on.
SEQ = 128


def pipeline_overrides(tmp_path: Path) -> list[str]:
    every_stage = [
        *TINY,
        f"model.max_seq_len={SEQ}",
        "train.max_steps=6",
        "train.val_batches=2",
        "checkpoint.every=0",
        f"runs_dir={tmp_path / 'runs'}",
        "resources.max_retries=0",
        "executor=local",
    ]
    # Pretraining and eval read data.dir, which the pipeline points at the data stage's tokenized/ (pretraining
    # prepares it from the cleaned corpus); eval finds the post-trained models' tokenizer by following
    # checkpoint.init_from back to the pretraining run.
    one_stage = [f"stages.{stage}.data.seq_len={SEQ}" for stage in ("sft", "dpo", "grpo")] + [
        "stages.pretrain.train.max_steps=20",
        "stages.dpo.dpo.val_max=8",
        "stages.grpo.train.max_steps=2",
        "stages.grpo.train.micro_batch_size=2",
        "stages.grpo.grpo.max_new_tokens=24",
        "stages.grpo.grpo.val_prompts=4",
        "stages.eval.eval.max_examples=4",
        "stages.eval.train.val_batches=2",
    ]
    return [*every_stage, *one_stage]


def report_value(report: str, metric: str, stage: str):
    """The number in `stage`'s column of the report's `metric` table row (None when absent)."""
    for line in report.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) > 1 and cells[0] == metric:
            header = _header_for(report, line)
            if header and stage in header:
                cell = cells[header.index(stage)]
                found = re.search(r"-?\d+(\.\d+)?", cell)
                return float(found.group()) if found else None
    return None


def _header_for(report: str, row: str) -> list[str]:
    """The header cells of the markdown table that holds `row`."""
    lines = report.splitlines()
    i = lines.index(row)
    while i > 0 and lines[i - 1].lstrip().startswith("|"):
        i -= 1
    return [c.strip() for c in lines[i].strip().strip("|").split("|")]


def test_default_pipeline_runs_every_stage_and_compares_them(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "orchestrator.cli",
            "submit",
            "--follow",
            str(REPO / "jobs" / "pipeline.yaml"),
            *pipeline_overrides(tmp_path),
        ],
        cwd=tmp_path,
        env=env_for(tmp_path),
        capture_output=True,
        text=True,
        timeout=600,
    )
    log = result.stdout[-4000:] + result.stderr[-3000:]
    assert result.returncode == 0, log

    runs = {r.stage: r for r in Registry(tmp_path / ".orch" / "registry.db").list()}
    assert sorted(runs) == sorted(["data", *STAGES, "eval"]), log
    assert {stage: r.state for stage, r in runs.items()} == {stage: "COMPLETED" for stage in runs}, log

    # pretrain read the data stage's cleaned corpus, and tokenized it beside it, where eval reads the val split
    data_dir = Path(runs["data"].run_dir)
    stats = json.loads((data_dir / "stats.json").read_text())
    assert stats["output_docs"] > 0 and (data_dir / "report.md").is_file()
    pretrain_cfg = OmegaConf.load(Path(runs["pretrain"].run_dir) / "config.yaml")
    assert list(pretrain_cfg.data.sources) == [str(data_dir / "corpus")]
    assert pretrain_cfg.checkpoint.init_from is None
    for stage in ("pretrain", "eval"):
        assert OmegaConf.load(Path(runs[stage].run_dir) / "config.yaml").data.dir == str(data_dir / "tokenized")
    meta = json.loads((data_dir / "tokenized" / "meta.json").read_text())
    assert meta["splits"]["train"]["documents"] == stats["output_docs"]

    # each stage started from its parent's run folder; eval compares the whole chain, in order
    chain = [*STAGES, "eval"]
    for parent, child in zip(chain, chain[1:]):
        child_cfg = OmegaConf.load(Path(runs[child].run_dir) / "config.yaml")
        assert child_cfg.checkpoint.init_from == runs[parent].run_dir
    eval_dir = Path(runs["eval"].run_dir)
    results = json.loads((eval_dir / "eval.json").read_text())
    assert list(results["stages"]) == STAGES
    for stage in STAGES:
        assert Path(results["stages"][stage]["run_dir"]) == Path(runs[stage].run_dir).resolve()

    report = (eval_dir / "report.md").read_text()
    for stage in STAGES:
        assert stage in report
        value = report_value(report, "val/bpb", stage)
        assert value is not None and 0 < value < 20, f"no val bpb for {stage} in report.md:\n{report}"
    pngs = sorted(p.name for p in eval_dir.rglob("*.png"))
    assert "metrics.png" in pngs, f"no metrics plot in {eval_dir}: {pngs}"
    for png in pngs:
        assert f"{png}" in report, f"report.md doesn't show {png}"


def test_the_status_dashboard_shows_stages_that_can_no_longer_run_and_changes_nothing(tmp_path):
    """`orch status` shows a local pipeline whose supervisor is gone (no pid file, registered 2 minutes ago) with
    its PENDING stages as cancelled, saying why, without writing: `orch pipeline reconcile` records it."""
    from orchestrator.pipelines import reconcile
    from orchestrator.status.collect import Collector

    registry = Registry(tmp_path / ".orch" / "registry.db")
    created = time.time() - 120
    for stage, state, parent in (
        ("pretrain", "FAILED", None),
        ("sft", "PENDING", "p-0a0b0c-pretrain"),
        ("dpo", "PENDING", "p-0a0b0c-sft"),
    ):
        run_dir = tmp_path / "runs" / f"p-0a0b0c-{stage}"
        run_dir.mkdir(parents=True)
        registry.add(
            Run(
                id=f"p-0a0b0c-{stage}",
                name=stage,
                kind="pretrain",
                executor="local",
                state=state,
                run_dir=str(run_dir),
                created_at=created,
                pipeline_id="p-0a0b0c",
                stage=stage,
                depends_on=parent,
            )
        )

    frame = Collector(registry, use_slurm=False).collect()

    states = {job.stage: job.state for job in frame.jobs}
    assert states == {"pretrain": "FAILED", "sft": "CANCELLED", "dpo": "CANCELLED"}
    assert "supervisor is gone" in next(j.reason for j in frame.jobs if j.stage == "dpo")
    assert registry.get("p-0a0b0c-dpo").state == "PENDING", "looking must not change the registry"
    reconcile(registry)  # what `orch pipeline reconcile` (or a resumed owner) does
    assert registry.get("p-0a0b0c-dpo").state == "CANCELLED"
    assert "supervisor is gone" in registry.get("p-0a0b0c-dpo").reason
    assert registry.active_pipelines() == []  # the next reconcile has nothing to check
