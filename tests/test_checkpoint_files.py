"""Checkpoint housekeeping on real files: which steps pruning keeps (never one for a damaged one), and a full
disk that stops a save with a clear error while the previous checkpoint stays whole."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from model.config import GPTConfig
from model.gpt import GPT
from tests.conftest import REPO
from training.checkpoint import CheckpointError, find_resumable, prune, save_checkpoint, step_dirs


def test_prune_keeps_the_newest_and_every_mth(tmp_path):
    root = tmp_path / "checkpoints"
    for step in range(10, 101, 10):  # complete checkpoints (a manifest listing no files): only those are pruned
        (root / f"step_{step:08d}").mkdir(parents=True)
        (root / f"step_{step:08d}" / "manifest.json").write_text('{"step": %d, "files": {}}' % step)
    (root / ".tmp-step_00000110").mkdir()  # a save in progress is not a checkpoint: left alone
    prune(root, keep_last=2, keep_every=40)
    kept = sorted(int(p.name.split("_")[1]) for p in step_dirs(root))
    assert kept == [40, 80, 90, 100]
    assert (root / ".tmp-step_00000110").is_dir()


WRITE_CHECKPOINTS = """
import sys, torch
from model.config import GPTConfig
from model.gpt import GPT
from training.checkpoint import save_checkpoint
model = GPT(GPTConfig(vocab_size=256, n_layer=2, n_head=4, d_model=32, max_seq_len=32))
model.init_weights(seed=0)
opt = torch.optim.AdamW(model.parameters())
for step in map(int, sys.argv[2:]):
    save_checkpoint(sys.argv[1], step, model, opt, {"step": step}, keep_last=100)
"""


def test_prune_never_counts_a_bit_flipped_checkpoint_nor_deletes_a_good_one_for_it(tmp_path):
    """Steps 4, 8, 12 written by an earlier trainer process; then one bit of step 8 flips (its size unchanged)."""
    subprocess.run(
        [sys.executable, "-c", WRITE_CHECKPOINTS, str(tmp_path), "4", "8", "12"],
        cwd=REPO,
        check=True,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    root = tmp_path / "checkpoints"
    shard = sorted((root / "step_00000008" / "model").glob("*.safetensors"))[0]
    with open(shard, "r+b") as f:
        f.seek(shard.stat().st_size - 1)
        last = f.read(1)[0]
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([last ^ 1]))
    assert prune(root, keep_last=2, keep_every=0) == [], "the good step 4 was deleted for the damaged step 8"
    assert [p.name for p in step_dirs(root)] == ["step_00000012", "step_00000008", "step_00000004"]
    model, opt = small_model(32)
    save_checkpoint(tmp_path, 16, model, opt, {"step": 16}, keep_last=2)  # 16 and 12 are the two newest good ones
    assert [p.name for p in step_dirs(root)] == ["step_00000016", "step_00000012", "step_00000008"]
    assert not list(root.glob(".trash-*")), "a pruned checkpoint's files were left behind"


def small_model(d_model: int) -> tuple[GPT, torch.optim.Optimizer]:
    model = GPT(GPTConfig(vocab_size=256, n_layer=2, n_head=4, d_model=d_model, max_seq_len=32))
    model.init_weights(seed=0)
    opt = torch.optim.AdamW(model.parameters())
    return model, opt


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MB tmpfs: a real file system that really fills up."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def test_full_disk_fails_clearly_and_keeps_the_previous_checkpoint(small_disk):
    run = small_disk / "run"
    model, opt = small_model(32)  # ~0.1 MB of weights and moments: fits
    first = save_checkpoint(run, 1, model, opt, {"step": 1})
    big, big_opt = small_model(512)  # ~25 MB with its moments: does not
    for p in big.parameters():
        p.grad = torch.zeros_like(p)
    big_opt.step()
    with pytest.raises(CheckpointError, match="full"):
        save_checkpoint(run, 2, big, big_opt, {"step": 2})
    assert find_resumable(run) == first  # still valid, still the newest
    assert [p.name for p in step_dirs(run / "checkpoints")] == ["step_00000001"]


def test_loading_into_a_model_of_another_shape_names_the_folder(tmp_path):
    model, opt = small_model(32)
    path = save_checkpoint(tmp_path / "run", 1, model, opt, {"step": 1})
    other, _ = small_model(64)
    from training.checkpoint import load_checkpoint

    with pytest.raises(CheckpointError, match=r"could not load .*step_00000001/model into this model"):
        load_checkpoint(path, other)


def test_streamed_safetensors_files_read_back_with_safetensors(tmp_path):
    """Checkpoint files are written straight from tensor memory (training/safetensors_writer.py): the
    safetensors library must read them back bit for bit, metadata included."""
    from safetensors import safe_open

    from training.safetensors_writer import write_safetensors

    g = torch.Generator().manual_seed(0)
    tensors = {
        "w": torch.randn(3, 5, generator=g),
        "half": torch.randn(7, generator=g).to(torch.bfloat16),
        "step": torch.tensor(12.0),
        "ids": torch.arange(4),
        "empty": torch.zeros(0, 2),
        "strided": torch.randn(4, 6, generator=g).t(),
    }  # not contiguous: written in logical order
    write_safetensors(tmp_path / "x.safetensors", tensors, {"note": "hello"})
    with safe_open(str(tmp_path / "x.safetensors"), framework="pt") as f:
        assert f.metadata() == {"note": "hello"}
        assert set(f.keys()) == set(tensors)
        for name, expected in tensors.items():
            got = f.get_tensor(name)
            assert got.dtype == expected.dtype and got.shape == expected.shape
            assert torch.equal(got, expected)


def test_async_save_keeps_its_steps_state_when_the_weights_change_after_wait_staged(tmp_path):
    """A background save copies the state while the next step runs; the trainer changes the weights
    only after wait_staged(). Whatever happens to them after that, the checkpoint holds the saved step."""
    from training.async_checkpoint import AsyncSaver
    from training.checkpoint import load_checkpoint

    model, opt = small_model(256)  # ~5 MB of weights and moments: the copy takes a while
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    moments = [opt.state[p]["exp_avg"].clone() for p in model.parameters()]
    saver = AsyncSaver()
    try:
        saver.save(tmp_path / "run", 1, model, opt, {"step": 1}, 2, 0)
        saver.wait_staged()
        opt.step()  # what the training step does right after: changes weights and moments in place
        saved = saver.wait()
    finally:
        saver.close()
    assert saved == find_resumable(tmp_path / "run")
    fresh, fresh_opt = small_model(256)
    for p in fresh.parameters():
        p.grad = torch.zeros_like(p)
    fresh_opt.step()
    load_checkpoint(saved, fresh, fresh_opt)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in weights.items())
    assert all(torch.equal(fresh_opt.state[p]["exp_avg"], m) for p, m in zip(fresh.parameters(), moments))


def test_streamed_reader_loads_what_torchs_reader_loads(tmp_path):
    """training/safetensors_reader.py reads whole tensors with readinto into contiguous CPU destinations
    and leaves the rest (here a transposed destination) to torch's code: both paths must give exactly
    what torch's own HuggingFaceStorageReader gives."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    from training.checkpoint import _writer
    from training.safetensors_reader import StreamingHFStorageReader

    g = torch.Generator().manual_seed(0)
    state = {
        "w": torch.randn(16, 8, generator=g),
        "half": torch.randn(33, generator=g).to(torch.bfloat16),
        "step": torch.tensor(7.0),
        "ids": torch.arange(5),
        "empty": torch.zeros(0, 3),
        "square": torch.randn(6, 6, generator=g),
    }
    dcp.save(state, storage_writer=_writer(tmp_path, state, distributed=False))

    def destinations() -> dict[str, torch.Tensor]:
        out = {k: torch.full_like(v, 3) for k, v in state.items()}
        out["square"] = torch.full((6, 6), 3.0).t()  # not contiguous: torch's code reads it
        return out

    ours, theirs = destinations(), destinations()
    dcp.load(ours, storage_reader=StreamingHFStorageReader(str(tmp_path)))
    dcp.load(theirs, storage_reader=HuggingFaceStorageReader(str(tmp_path)))
    for name, expected in state.items():
        assert torch.equal(ours[name], expected) and torch.equal(theirs[name], expected), name
        assert ours[name].dtype == expected.dtype
