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
    train(1, compiled, tiny_data, *STEPS, "train.compile=true")
    assert losses(compiled) == pytest.approx(losses(plain_run), rel=1e-4)
    ckpt = "checkpoints/step_00000006"
    names = checkpoint_weights(compiled / ckpt).keys()
    assert names == checkpoint_weights(plain_run / ckpt).keys()
    assert not any("_orig_mod" in n or "_checkpoint_wrapped" in n for n in names)
