"""Activation checkpointing and per-block torch.compile change how a step is computed, not what it
computes: the same losses, and checkpoints interchangeable with plain runs (same tensor names)."""

from __future__ import annotations

import pytest

from tests.test_distributed import checkpoint_weights, losses, train

pytestmark = pytest.mark.slow
STEPS = ["train.max_steps=6", "train.deterministic=true"]


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory, tiny_data):
    run = tmp_path_factory.mktemp("plain") / "run"
    train(1, run, tiny_data, *STEPS)
    return run


def test_activation_checkpointing_gives_the_same_losses_on_two_ranks(tmp_path, tiny_data):
    plain, ac = tmp_path / "plain", tmp_path / "ac"
    train(2, plain, tiny_data, *STEPS)
    train(2, ac, tiny_data, *STEPS, "train.activation_checkpointing=true")
    assert losses(ac) == pytest.approx(losses(plain), rel=1e-6)
    ckpt = "checkpoints/step_00000006"
    assert checkpoint_weights(ac / ckpt).keys() == checkpoint_weights(plain / ckpt).keys()


def test_compiled_blocks_give_the_same_losses_and_checkpoint_names(tmp_path, tiny_data, plain_run):
    compiled = tmp_path / "compiled"
    result = train(1, compiled, tiny_data, *STEPS, "train.compile=true")
    assert losses(compiled) == pytest.approx(losses(plain_run), rel=1e-4)
    assert "No CUDA runtime is found" not in result.stderr  # torch's import-time warning, noise on a CPU
    ckpt = "checkpoints/step_00000006"
    names = checkpoint_weights(compiled / ckpt).keys()
    assert names == checkpoint_weights(plain_run / ckpt).keys()
    assert not any("_orig_mod" in n or "_checkpoint_wrapped" in n for n in names)


def test_compile_under_tensor_parallelism_trains_eager_and_says_so(tmp_path, tiny_data):
    """The demo job compiles; a user who adds parallel.tp=2 gets eager training and a note, not the crash
    torch 2.14's DTensor backward gives compiled blocks (it failed at the first backward before)."""
    result = train(2, tmp_path / "tp2", tiny_data, "train.max_steps=2", "train.compile=true", tp=2)
    assert "train.compile is not used with parallel.tp > 1" in result.stderr
    assert len(losses(tmp_path / "tp2")) == 2


def test_time_budget_ends_the_schedule_early_and_anneals(tmp_path, tiny_data):
    """A budget too small for train.max_steps: the trainer times steps 10-30, moves the end of the LR
    schedule to the step the budget allows, and finishes there with the LR annealed, not cut off."""
    import json

    run = tmp_path / "budget"
    result = train(
        1,
        run,
        tiny_data,
        "train.max_steps=1000000",
        "train.time_budget_min=0.15",
        "train.log_every=5",
        "train.val_every=0",
        "checkpoint.every=0",
        "optim.min_lr_ratio=0.0",
    )
    assert "the schedule now ends at step" in result.stdout
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "lr" in r]
    fitted = train_records[-1]["max_steps"]
    assert 30 < fitted < 1_000_000
    summary = json.loads((run / "summary.json").read_text())
    assert summary["step"] <= fitted and summary["train_minutes"] < 0.15 * 1.2
    peak_lr = max(r["lr"] for r in train_records)
    assert train_records[-1]["lr"] < 0.1 * peak_lr  # annealed by the end, whichever limit stopped it
