"""The training loop's waits on the device, counted on the CPU: every read of a tensor's value by the host (.item(),
.tolist(), bool(), float(), ...) is what blocks a GPU's queue, so a step may make one (the loss, the gradient norm and
the stop flags together, which the decision to apply the step needs) and no more."""

from __future__ import annotations

import collections
import sys
from pathlib import Path

import torch

from jobspec import load_spec
from tests.conftest import REPO, tiny_overrides
from training.distributed import init_distributed
from training.tasks.pretrain import PretrainTask
from training.trainer import Trainer

READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy")
STEPS, LOG_EVERY = 8, 4
HOST_SIDE = ("training/data/", "torch/utils/data/")


def count_reads(monkeypatch, trainer: Trainer) -> dict[int, int]:
    """Patch every host read of a tensor; each read is charged to the step under way (0 = before the first)."""
    per_step: dict[int, int] = collections.Counter()
    current = {"step": 0}

    def counted(name):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            # the loader's own CPU tensors (batches and seeds made on the host, never on the device) are no reads
            caller = sys._getframe(1).f_code.co_filename
            if not any(part in caller for part in HOST_SIDE):
                per_step[current["step"]] += 1
            return original(self, *args, **kwargs)

        return read

    for name in READS:
        monkeypatch.setattr(torch.Tensor, name, counted(name))
    train_step = trainer.train_step

    def step_under_way():
        current["step"] = trainer.step + 1  # charged until the next step starts: logging and stop checks included
        return train_step()

    monkeypatch.setattr(trainer, "train_step", step_under_way)
    return per_step


def test_one_read_per_step(tmp_path, tiny_data, monkeypatch):
    """Muon with gradient accumulation: the optimizer with work of its own, and micro-batches counted on the device."""
    cfg = load_spec(
        str(REPO / "jobs" / "pretrain.yaml"),
        tiny_overrides(
            tiny_data,
            f"train.max_steps={STEPS + 1}",  # the last step also validates and saves: not counted
            f"train.log_every={LOG_EVERY}",
            "optim.name=muon",
            "train.grad_accum_steps=2",
            "train.val_batches=1",
            "checkpoint.every=0",
        ),
    )
    run_dir = Path(tmp_path) / "run"
    run_dir.mkdir()
    dist_info = init_distributed(cfg.parallel, cfg.train.device)
    trainer = Trainer(cfg, dist_info, run_dir, PretrainTask(cfg, dist_info, run_dir))
    per_step = count_reads(monkeypatch, trainer)
    assert trainer.fit() == 0
    reads = {step: per_step[step] for step in range(1, STEPS + 1)}
    assert all(n >= 1 for n in reads.values()), reads  # the counter sees the step's own read
    quiet = {step: n for step, n in reads.items() if step % LOG_EVERY}
    assert max(quiet.values()) <= 1, f"device-to-host reads per non-logging step: {quiet}"
