"""The launchers' wait between their stop signal and SIGKILL follows the save time the trainer recorded in the run
folder (jobspec.contract.stop_grace_s): torchrun's --shutdown-timeout locally, the SIGUSR2 lead on Slurm."""

from __future__ import annotations

from types import SimpleNamespace

from jobspec.contract import STOP_GRACE_S, RunFolder, stop_grace_s
from orchestrator.executors import slurm
from orchestrator.executors.local_supervisor import trainer_command


def test_the_grace_follows_the_timed_save(tmp_path):
    folder = RunFolder(tmp_path)
    run = SimpleNamespace(run_dir=str(tmp_path))
    assert stop_grace_s(folder) == STOP_GRACE_S and stop_grace_s(folder, untimed=0) == 0  # nothing timed yet
    assert f"--shutdown-timeout={STOP_GRACE_S}" in trainer_command(run, 2)
    folder.logs.mkdir()
    folder.save_seconds.write_text("40.2\n")  # as training.checkpoint records it
    assert stop_grace_s(folder) == STOP_GRACE_S + 81
    assert f"--shutdown-timeout={STOP_GRACE_S + 81}" in trainer_command(run, 2)
    assert not any("shutdown" in arg for arg in trainer_command(run, 1)), "one process: no torchrun"
    assert slurm.signal_delay_s(10, 0) == 60  # a tenth of the limit when nothing is timed
    assert slurm.signal_delay_s(10, stop_grace_s(folder, untimed=0)) == STOP_GRACE_S + 81
    assert slurm.signal_delay_s(2, stop_grace_s(folder, untimed=0)) == 60, "at most half the time limit"
    folder.save_seconds.write_text("nan\n")
    assert stop_grace_s(folder) == STOP_GRACE_S
