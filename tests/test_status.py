"""`orch status`: facts from a real registry and real run folders, a frame that fits 80 columns, --json,
--once without Slurm, and the live dashboard read off a real terminal (tmux) while a tiny job trains."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from jobspec.processes import process_start
from orchestrator.registry import Registry, Run
from orchestrator.status.collect import Collector
from orchestrator.status.render import render
from tests.conftest import REPO, env_for, tiny_overrides
from tests.test_slurm_cluster import slurm_cluster  # noqa: F401 - the fixture, for the Slurm variant

IN_CI = os.environ.get("CI", "").lower() == "true"


# ---------------------------------------------------------------- run folders written by hand


def make_run(
    registry: Registry,
    root: Path,
    run_id: str,
    state: str = "RUNNING",
    max_steps: int = 100,
    records: list[dict] = (),
    checkpoints: list[int] = (),
    log: str = "",
    **fields,
) -> Run:
    run_dir = root / "runs" / run_id
    (run_dir / "logs").mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"kind": "pretrain", "train": {"max_steps": max_steps}}))
    with open(run_dir / "metrics.jsonl", "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    for step in checkpoints:
        (run_dir / "checkpoints" / f"step_{step:08d}").mkdir(parents=True)
    (run_dir / "logs" / "train.log").write_text(log)
    created = fields.pop("created_at", time.time())
    if state in ("RUNNING", "CANCELLING") and fields.get("executor", "local") == "local":
        # a live run has a live supervisor: this test process stands in for it (pid + start time)
        fields.setdefault("pid", os.getpid())
        fields.setdefault("pid_start", process_start(os.getpid()))
    run = Run(
        id=run_id,
        name=run_id.rsplit("-", 1)[0],
        kind="pretrain",
        executor=fields.pop("executor", "local"),
        state=state,
        run_dir=str(run_dir),
        created_at=created,
        started_at=created,
        **fields,
    )
    registry.add(run)
    return run


def train_record(step: int, loss: float, **extra) -> dict:
    return {
        "time": time.time(),
        "step": step,
        "loss": loss,
        "lr": 1e-3,
        "grad_norm": 1.0,
        "tokens_per_s": 1500.0 + step,
        "tokens_seen": 512 * step,
        "mfu": None,
        "eta_s": 100.0 - step,
        **extra,
    }


@pytest.fixture
def registry(tmp_path) -> Registry:
    return Registry(tmp_path / ".orch" / "registry.db")


def populate(registry: Registry, root: Path) -> None:
    """A running run, a finished one, and a three-stage pipeline, with ids as long as real ones."""
    make_run(
        registry,
        root,
        "pretrain-a1b2c3",
        records=[train_record(s, 4.0 - s / 10) for s in (5, 10, 15)],
        checkpoints=[10],
        log="step     15/100 | loss 2.5000 | 1,515 tok/s\n",
    )
    make_run(
        registry,
        root,
        "pretrain-d4e5f6",
        state="COMPLETED",
        max_steps=20,
        records=[train_record(s, 3.0) for s in (10, 20)],
        checkpoints=[20],
        created_at=time.time() - 100,
    )
    parent = None
    # Registered seconds ago: a pipeline younger than a minute has no supervisor yet and keeps its stages.
    for stage in ("pretrain", "sft", "dpo"):
        run = make_run(
            registry,
            root,
            f"chain-{stage}-0a0b0c",
            state="PENDING" if parent else "RUNNING",
            pipeline_id="chain-0a0b0c",
            stage=stage,
            depends_on=parent,
            created_at=time.time() - 5,
        )
        parent = run.id


def frame_text(frame, width: int, height=None) -> str:
    console = Console(width=width, record=True, file=io.StringIO(), color_system=None)
    console.print(render(frame, width=width, height=height))
    return console.export_text()


# ---------------------------------------------------------------- collect


def test_collect_reads_step_loss_throughput_and_eta(registry, tmp_path):
    records = [
        train_record(5, 3.5),
        train_record(10, 3.1, mfu=0.25),
        {"time": time.time(), "step": 10, "val_loss": 3.3, "val_bpb": 1.9},
    ]
    make_run(registry, tmp_path, "pretrain-a1b2c3", records=records, checkpoints=[5, 10], max_steps=40)
    (job,) = Collector(registry, use_slurm=False).collect().jobs
    assert (job.step, job.max_steps, job.loss, job.tokens_per_s, job.eta_s) == (10, 40, 3.1, 1510.0, 90.0)
    assert job.mfu == 0.25 and job.val_loss == 3.3
    assert job.losses == [3.5, 3.1]
    assert job.last_checkpoint == "step_00000010"


def test_collect_reads_only_appended_whole_lines(registry, tmp_path):
    run = make_run(registry, tmp_path, "pretrain-a1b2c3", records=[train_record(5, 3.5)])
    metrics = Path(run.run_dir) / "metrics.jsonl"
    collector = Collector(registry, use_slurm=False)
    assert collector.collect().jobs[0].step == 5
    line = json.dumps(train_record(10, 3.0))
    with open(metrics, "a") as f:
        f.write(line[:20])  # the trainer is half-way through writing a line
    assert collector.collect().jobs[0].step == 5
    with open(metrics, "a") as f:
        f.write(line[20:] + "\n")
    job = collector.collect().jobs[0]
    assert (job.step, job.loss, job.losses) == (10, 3.0, [3.5, 3.0])
    assert collector.metrics.files[str(metrics)].offset == metrics.stat().st_size


def test_missing_keys_show_a_dash(registry, tmp_path):
    make_run(registry, tmp_path, "sft-a1b2c3", records=[{"step": 3, "loss": 2.0}])  # no tokens_per_s, eta, mfu
    frame = Collector(registry, use_slurm=False).collect()
    job = frame.jobs[0]
    assert job.tokens_per_s is None and job.eta_s is None and job.mfu is None
    row = next(line for line in frame_text(frame, 200).splitlines() if "sft-a1b2c3" in line)
    assert "3/100" in row and "2.000" in row and " - " in row


def test_finished_runs_are_not_read_again(registry, tmp_path):
    run = make_run(registry, tmp_path, "pretrain-d4e5f6", state="COMPLETED", records=[train_record(20, 3.0)])
    collector = Collector(registry, use_slurm=False)
    first = collector.collect().jobs[0]
    with open(Path(run.run_dir) / "metrics.jsonl", "a") as f:  # nothing should read this any more
        f.write(json.dumps(train_record(99, 1.0)) + "\n")
    assert collector.collect().jobs[0] is first
    assert first.step == 20 and first.eta_s is None  # an ended run has no ETA


# ---------------------------------------------------------------- render


@pytest.mark.parametrize("width", [80, 60, 160])
def test_frame_fits_the_width_and_shows_the_facts(registry, tmp_path, width):
    populate(registry, tmp_path)
    frame = Collector(registry, use_slurm=False).collect()
    text = frame_text(frame, width)
    too_wide = [line for line in text.splitlines() if len(line) > width]
    assert not too_wide, too_wide
    for fact in (
        "pretrain-a1b2c3",
        "RUNNING",
        "COMPLETED",
        "PENDING",
        "15/100",
        "20/20",
        "chain-0a0b0c",
        "sft",
        "dpo",
        "this machine",
        "step     15/100",
    ):
        assert fact in text, f"{fact!r} missing at width {width}:\n{text}"
    if width >= 80:
        assert "2.500" in text and "1.5k" in text  # loss and tokens/s of the running run


def test_live_frame_fits_a_small_screen(registry, tmp_path):
    for i in range(60):
        make_run(registry, tmp_path, f"pretrain-{i:06x}", records=[train_record(5, 3.0)])
    frame = Collector(registry, use_slurm=False).collect()
    lines = frame_text(frame, 80, height=24).splitlines()
    assert len(lines) <= 24, "\n".join(lines)
    assert any("more runs" in line for line in lines)


def test_live_frame_gives_spare_lines_to_the_log(registry, tmp_path):
    make_run(
        registry,
        tmp_path,
        "pretrain-a1b2c3",
        records=[train_record(5, 3.0)],
        log="".join(f"log line {i}\n" for i in range(100)),
    )
    frame = Collector(registry, use_slurm=False).collect()
    text = frame_text(frame, 80, height=40)
    assert len(text.splitlines()) <= 40, text
    assert "log line 99" in text and "log line 80" in text  # 20+ lines of log: the screen had room


# ---------------------------------------------------------------- the command


def orch(tmp_path, *args, path: str | None = None, **kw):
    env = env_for(tmp_path)
    if path is not None:
        env["PATH"] = path
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        **kw,
    )


def test_json_parses_and_narrows_to_a_pipeline(registry, tmp_path):
    populate(registry, tmp_path)
    result = orch(tmp_path, "status", "--json")
    assert result.returncode == 0, result.stderr
    facts = json.loads(result.stdout)
    assert {j["run_id"] for j in facts["jobs"]} >= {"pretrain-a1b2c3", "pretrain-d4e5f6", "chain-sft-0a0b0c"}
    running = next(j for j in facts["jobs"] if j["run_id"] == "pretrain-a1b2c3")
    assert (running["step"], running["loss"], running["max_steps"]) == (15, 2.5, 100)
    assert facts["pipelines"][0]["pipeline_id"] == "chain-0a0b0c"
    assert [s["stage"] for s in facts["pipelines"][0]["stages"]] == ["pretrain", "sft", "dpo"]
    narrowed = json.loads(orch(tmp_path, "status", "chain-0a", "--json").stdout)
    assert {j["pipeline_id"] for j in narrowed["jobs"]} == {"chain-0a0b0c"} and len(narrowed["jobs"]) == 3


def test_once_without_slurm_says_so_in_plain_text(registry, tmp_path):
    populate(registry, tmp_path)
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    result = orch(tmp_path, "status", "--once", "pretrain-d4", path=str(empty_bin))  # no sbatch, sinfo, scontrol
    assert result.returncode == 0, result.stderr
    assert "Slurm not found" in result.stdout and "this machine" in result.stdout
    assert "\x1b[" not in result.stdout  # not a tty: no ANSI codes
    assert "pretrain-d4e5f6" in result.stdout and "pretrain-a1b2c3" not in result.stdout
    assert all(len(line) <= 80 for line in result.stdout.splitlines())


def test_unknown_target_is_an_error(registry, tmp_path):
    populate(registry, tmp_path)
    result = orch(tmp_path, "status", "nosuchrun", "--once")
    assert result.returncode == 2 and "no run matches 'nosuchrun'" in result.stderr


# ---------------------------------------------------------------- the live screen, in a real terminal


def tmux_or_skip() -> str:
    tmux = shutil.which("tmux")
    if tmux is None and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "-q", "tmux"], capture_output=True, timeout=300)
        tmux = shutil.which("tmux")
    if tmux is None:
        if IN_CI:
            pytest.fail("CI=true, so the tmux dashboard test must run: install tmux", pytrace=False)
        pytest.skip("tmux is not installed (apt-get install tmux)")
    return tmux


class Screen:
    """`orch status` in a detached tmux session of 80x30, read with `tmux capture-pane -p`."""

    def __init__(self, tmp_path: Path, tmux: str):
        self.tmux, self.socket, self.session = tmux, f"orch-status-{os.getpid()}", "dash"
        env = env_for(tmp_path)
        exports = " ".join(f"{k}={env[k]}" for k in ("PYTHONPATH", "ORCH_HOME", "PATH"))
        command = f"cd {tmp_path} && env TERM=xterm-256color {exports} {sys.executable} -m orchestrator.cli status"
        self._tmux("new-session", "-d", "-s", self.session, "-x", "80", "-y", "30", command)

    def _tmux(self, *args) -> str:
        return subprocess.run(
            [self.tmux, "-L", self.socket, *args], capture_output=True, text=True, check=True, timeout=30
        ).stdout

    def text(self) -> str:
        return self._tmux("capture-pane", "-p", "-t", self.session)

    def close(self) -> None:
        subprocess.run([self.tmux, "-L", self.socket, "kill-server"], capture_output=True, timeout=30)


def poll(predicate, timeout: float, what: str, screen: Screen):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(
                f"timed out after {timeout:.0f}s waiting for {what}; the screen:\n{screen.text()}", pytrace=False
            )
        time.sleep(0.2)


def watch_a_job(tmp_path: Path, tiny_data: str, *extra: str) -> None:
    screen = Screen(tmp_path, tmux_or_skip())
    try:
        poll(lambda: "orch status" in screen.text(), 60, "the dashboard to draw", screen)
        max_steps = 200
        submitted = orch(
            tmp_path,
            "submit",
            str(REPO / "jobs" / "pretrain.yaml"),
            *tiny_overrides(
                tiny_data,
                f"runs_dir={tmp_path / 'runs'}",
                f"train.max_steps={max_steps}",
                "train.log_every=2",
                "checkpoint.every=100",
                *extra,
            ),
        )
        assert submitted.returncode == 0, submitted.stderr
        run_id = submitted.stdout.split()[1]
        row = re.compile(rf"^{re.escape(run_id[:16])}\S*\s+(\w+)\s+(\d+|-)/{max_steps}", re.M)
        states, steps = [], []

        def observe():
            match = row.search(screen.text())
            if match:
                state, step = match.group(1), match.group(2)
                if not states or states[-1] != state:
                    states.append(state)
                if step != "-" and (not steps or steps[-1] != int(step)):
                    steps.append(int(step))
            return states and states[-1] == "COMPLETED"

        poll(observe, 300, f"{run_id} to show COMPLETED", screen)
        assert states[0] in ("PENDING", "RUNNING"), states
        assert len(steps) >= 2 and steps == sorted(steps) and steps[-1] == max_steps, steps
        assert "Ctrl-C" in screen.text()  # still the live view, not a one-off print
        print(f"dashboard showed {run_id}: states {states}, steps {steps}")
    finally:
        screen.close()


@pytest.mark.slow
def test_live_dashboard_follows_a_local_job(tmp_path, tiny_data):
    watch_a_job(tmp_path, tiny_data, "executor=local")


@pytest.mark.slow
@pytest.mark.slurm
def test_live_dashboard_follows_a_slurm_job(tmp_path, tiny_data, request):
    request.getfixturevalue("slurm_cluster")
    watch_a_job(tmp_path, tiny_data, "executor=slurm", "resources.cpus_per_task=1")


def test_node_line_parsing_counts_cpus_and_gpus():
    from orchestrator.status.slurm_query import parse_nodes

    line = (
        "NodeName=gpu7 Arch=x86_64 CoresPerSocket=32 CPUAlloc=48 CPUEfctv=64 CPUTot=64 CPULoad=47.90 "
        "Gres=gpu:h100:8 NodeAddr=gpu7 OS=Linux 6.8 #1 SMP State=MIXED Partitions=gpu,debug "
        "CfgTRES=cpu=64,mem=1000G,billing=64,gres/gpu=8 AllocTRES=cpu=48,mem=500G,gres/gpu=6 "
        "Reason=Kill task failed [root@2026-11-24T10:00:00]"
    )
    (node,) = parse_nodes(line)
    assert (node.name, node.state, node.cpus_alloc, node.cpus_total) == ("gpu7", "MIXED", 48, 64)
    assert (node.gpus_alloc, node.gpus_total, node.load) == (6, 8, 47.9)
    assert node.partitions == "gpu,debug" and node.reason.startswith("Kill task failed")
