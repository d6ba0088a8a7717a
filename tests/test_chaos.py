"""The chaos suite in CI: one fault of each of kinds 1 to 13, run by the benchmark's own code
(bench/chaos; `python -m bench.chaos --faults 100` draws a hundred, docs/reliability.md has the table). Each
case is a real run of 2 ranks through a real executor, and passes only if the run finished, ended bitwise equal
to an uninterrupted run, lost no committed checkpoint, burned no retry on an error retrying can't fix, left no
process, `.tmp-*` folder or /dev/shm block behind, the registry says what happened, its fault fired, and it
restarted as its fault implies. The last tests check that the harness's score can fail: one real run that lost
its checkpoints, scored as a fault that never fired, as a deleted checkpoint folder and as a missing retry.

Some cases are the tests of the defects the suite found (named in their comments): each fails without its fix.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from test_slurm_cluster import slurm_cluster  # noqa: F401  (the session fixture)

from bench.chaos.__main__ import context
from bench.chaos.census import Outcome
from bench.chaos.kinds import KINDS, Fault, score
from bench.chaos.kinds.control import listed_state
from bench.chaos.kinds.saves import fill
from bench.chaos.reference import References, resolved
from bench.chaos.run import draw, draw_one
from bench.chaos.watch import Watch, processes_of, trainer_folder
from bench.chaos.workspace import Workspace, wait_for
from jobspec.faults import FAULT_POINTS

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]

# The fault of each kind that CI runs: its seed, and what that seed draws (checked below, so that a change to a
# kind's drawing can't silently swap the case for another).
CASES = {
    1: (9, "checkpoint.commit#3:kill {'keep_last': 1, 'async': True"),  # the commit of the newest, with keep_last 1
    2: (9, "'signal': 'cancel+resume', 'phase': 'sync_save'"),  # `orch cancel` during a save, `orch resume` at once
    3: (0, "train.after_optimizer_step#13:wait"),  # a node lost (kind 3 Slurm defect: NODE_FAIL read as FAILED)
    4: (0, "train.after_optimizer_step#14:wait"),  # a full disk (defect: an empty reason, retries burned on it)
    5: (13, "'target': 'model shard', 'damage': 'bitflip', 'restart': 'kill'"),
    6: (5, "supervisor SIGKILL"),
    7: (2, "cancel; gap; resume"),
    8: (0, "registry.write#1:kill"),
    9: (9, "checkpoint.shard_write@1#6:hang"),  # a hung background writer (defect: the job held for 30 minutes)
    10: (1, "train.loss#19:nan"),
    11: (0, "'jump_h': 1"),
    12: (0, "'user_step': 100"),
    13: (5, "'cancel': 'orch pipeline cancel'"),  # defect: every stage marked CANCELLED, the Slurm jobs left running
}


@pytest.fixture(scope="session")
def chaos(tmp_path_factory, tiny_data):
    return context(tmp_path_factory.mktemp("chaos"), Path(tiny_data))


def run_case(chaos, kind: int, executor: str):
    seed, expected = CASES[kind]
    fault = draw_one(kind, seed, executor)
    assert expected in fault.label, fault.label
    out = KINDS[kind].run(fault, chaos)
    assert out.ok, f"{fault.label}: {out.row()['outcome']}\n" + "\n".join(out.notes)
    return out


@pytest.mark.parametrize("kind", sorted(set(CASES) - {3, 13}))
def test_one_fault_of_each_kind_leaves_the_run_whole(chaos, kind):
    run_case(chaos, kind, "local")


@pytest.mark.slurm
def test_a_node_lost_on_the_local_slurm_cluster(chaos, slurm_cluster):  # noqa: F811
    run_case(chaos, 3, "slurm")


@pytest.mark.slurm
def test_a_pipeline_cancelled_on_the_local_slurm_cluster(chaos, slurm_cluster):  # noqa: F811
    run_case(chaos, 13, "slurm")


def test_every_fault_point_is_placed_in_the_code():
    sources = "".join(p.read_text() for d in ("orchestrator", "training", "jobspec") for p in (REPO / d).rglob("*.py"))
    placed = set(re.findall(r"""\bfault\(\s*["']([\w.]+)["']""", sources))
    assert set(FAULT_POINTS) == placed, (set(FAULT_POINTS) - placed, placed - set(FAULT_POINTS))


def test_faults_are_drawn_from_the_seed_alone():
    a, b = draw(24, 7, list(KINDS), "slurm"), draw(24, 7, list(KINDS), "slurm")
    assert [f.label for f in a] == [f.label for f in b]
    assert {f.kind for f in a} == set(KINDS), "two rounds visit every kind"
    replayed = draw_one(a[5].kind, a[5].seed, "slurm")
    assert replayed.label == a[5].label


# ---------------------------------------------------------------- defects the suite found, each on its own


def test_a_submit_killed_after_registering_shows_lost_not_pending_forever(chaos, tmp_path):
    ws = Workspace(tmp_path, chaos.data_dir)
    _, result = ws.submit(env=ws.env("submit.registered:kill"), check=False)
    assert result.returncode == 137, result.stderr
    (run,) = ws.registry.list()
    assert listed_state(ws, run.id) == "LOST"
    assert ws.run(run.id).state == "PENDING", "looking must not change the registry"
    ws.orch("reconcile", run.id, check=True)
    assert ws.run(run.id).state == "FAILED" and "gone" in ws.run(run.id).reason


def test_a_trainer_that_died_of_a_full_disk_fails_once_saying_so(chaos, tmp_path):
    ws = Workspace(tmp_path, chaos.data_dir)
    ws.runs_dir.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(ws.runs_dir)]).returncode:
        pytest.skip("mounting a small tmpfs needs root")
    try:
        run_id, _ = ws.submit(
            "resources.nproc_per_node=1", "resources.max_retries=2", env=ws.env("supervisor.started:wait")
        )
        log = Path(ws.run(run_id).run_dir) / "logs" / "supervisor.log"
        wait_for(lambda: log.is_file() and "[orch fault]" in log.read_text(), "the supervisor to be held")
        fill(ws.runs_dir)  # before the trainer starts: it can't even write its lock file's note
        ws.release()
        run = ws.wait_finished(run_id, 300)
        assert run.state == "FAILED" and run.attempts == 1, (run.state, run.attempts, run.reason)
        assert "full" in run.reason, run.reason
    finally:
        subprocess.run(["umount", "-l", str(ws.runs_dir)])


# ---------------------------------------------------------------- the harness's own score must be able to fail


WAIT = "train.after_optimizer_step#5:wait"  # step 4 is saved by then
NEVER = "checkpoint.shard_write@1#999:kill"  # armed too, but rank 1 writes 8 files a save, 56 in all


@pytest.fixture(scope="module")
def lost_run(chaos):
    """One real run of the chaos job, local executor, that loses every checkpoint: held at step 5, its checkpoints/
    deleted and its trainers killed, it is retried and trains again from step 0. Being deterministic, it ends bit
    for bit where the reference does, trainer state included. The tests below score it as different faults."""
    reference = chaos.references.get()
    ws = chaos.workspace(Fault(1, 0, "local", WAIT))
    with Watch(ws) as watch:
        run_id, _ = ws.submit(env=ws.env(f"{WAIT},{NEVER}"))
        watch.wait("fault", run_id)
        shutil.rmtree(Path(ws.run(run_id).run_dir) / "checkpoints")
        for proc in processes_of(ws):
            if trainer_folder(proc):
                os.kill(proc.pid, signal.SIGKILL)
        ws.release()
        ws.wait_finished(run_id)
    return ws, watch, run_id, reference


def test_a_fault_that_never_fires_fails_the_harness(lost_run):
    """`checkpoint.shard_write@1#999:kill`, scored as its kind scores it (one retry, step 4 the floor): the run
    had its retry, for another reason; the kill itself never came, and that tested nothing."""
    out = score(*lost_run, Outcome(), spec=NEVER, retries=1, floor=4)
    assert out.not_fired and not out.ok, out.notes
    assert out.row()["outcome"].startswith("not fired"), out.row()["outcome"]


def test_a_deleted_checkpoint_folder_fails_the_harness_though_the_run_ends_bitwise_equal(lost_run):
    """No floor given: the trainer's own records (step 4 saved, then a restart with no "resumed from") show the
    loss, as they must in every kind."""
    out = score(*lost_run, Outcome(), spec=WAIT, retries=1)
    assert out.finished and out.bitwise_equal and not out.not_fired and not out.wrong_restarts, out.notes
    assert out.checkpoints_lost == 1 and not out.ok, out.notes
    assert "a restart resumed from step 0, but step 4 was committed" in out.notes, out.notes


def test_a_missing_retry_fails_the_harness(lost_run):
    """Scored as a fault that implies two retries (a kill in each of two attempts): the run had one."""
    out = score(*lost_run, Outcome(), spec=WAIT, retries=2)
    assert out.wrong_restarts == 1 and not out.crash_loops and not out.ok, out.notes
    assert "1 retries, but the fault implies 2" in out.notes, out.notes


def test_a_reference_is_keyed_on_the_resolved_config_the_libraries_and_the_machine(tmp_path):
    refs = References(tmp_path, tmp_path / "data")
    plain = refs.key((), "")
    assert refs.key(("checkpoint.keep_last=1", "checkpoint.async_save=true", "executor=slurm"), "") == plain
    assert refs.key(("optim.name=muon",), "") != plain  # a key the chaos job does not set, as resolved
    assert refs.key((), "train.loss#3:nan") != plain
    refs.machine = {**refs.machine, "torch": "0.0.0"}
    assert refs.key((), "") != plain
    refs.machine = {**refs.machine, "cpu": "another CPU"}
    assert refs.key((), "") != plain
    # the recipe docs/reliability.md states, whatever jobs/pretrain.yaml's demo recipe is
    cfg = resolved(tmp_path / "data", ())
    assert (cfg["optim"]["name"], cfg["optim"]["schedule"]) == ("adamw", "cosine")
    assert cfg["train"]["compile"] is False and cfg["train"]["time_budget_min"] is None
