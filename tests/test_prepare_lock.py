"""Preparing data once for every rank of a job without a collective (training/data/prepare.py): the ranks wait on
the data folder's file lock, for as long as the preparation takes, and then read what the holder prepared."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from jobspec import load_spec
from tests.conftest import REPO, env_for, tiny_overrides
from training.data.prepare import preparation_lock, prepare_data

WAITER = """
import json, sys
from jobspec import load_spec
from training.data.prepare import ensure_data
cfg = load_spec(sys.argv[1], sys.argv[2:])
print(json.dumps(ensure_data(cfg.data, progress=True)["fingerprint"]), flush=True)
"""


def test_a_rank_waits_on_the_lock_and_reads_what_the_holder_prepared(tmp_path):
    data_dir = tmp_path / "data"
    overrides = tiny_overrides(str(data_dir), "data.max_docs=40")
    cfg = load_spec(str(REPO / "jobs" / "pretrain.yaml"), overrides)
    with preparation_lock(data_dir):
        waiter = subprocess.Popen(
            [sys.executable, "-c", WAITER, str(REPO / "jobs" / "pretrain.yaml"), *overrides],
            env=env_for(tmp_path),
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        first = waiter.stdout.readline()
        assert first.startswith("data: waiting for another process to prepare"), first
        meta = prepare_data(cfg.data, progress=False)  # while the other process waits on the lock
    rest = waiter.communicate(timeout=300)[0]
    assert waiter.returncode == 0, rest
    assert "tokeniz" not in rest  # it prepared nothing itself
    assert rest.strip().splitlines()[-1] == f'"{meta["fingerprint"]}"'
    assert not Path(str(data_dir) + ".tmp").exists() and (data_dir / "meta.json").exists()
