"""GPU forms of CPU tests, for a machine with CUDA: `python -m pytest tests/gpu` (or `bash bench/gpu_session.sh`).

CI has no GPU and does not collect this folder (pyproject: norecursedirs); each test's CPU/gloo twin
runs there instead (named in its docstring).
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.test_distributed import checkpoint_weights, losses, train

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
ON_GPU = ["train.device=cuda", "train.dtype=bf16"]


def test_bf16_compiled_pretrain_resumes_with_the_same_losses(tmp_path, tiny_data):
    """Twin: tests/test_distributed.py (exact resume on gloo) and test_train_options.py (compile).
    On the GPU: bf16 autocast, per-block torch.compile, fused AdamW; a run resumed from its step-10
    checkpoint repeats steps 11-20 (to bf16 noise: GPU kernels are not bitwise deterministic)."""
    steps = [*ON_GPU, "train.compile=true", "train.max_steps=20", "checkpoint.every=10", "checkpoint.keep_last=3"]
    run = tmp_path / "run"
    train(1, run, tiny_data, *steps)
    first = losses(run)
    assert sorted(first) == list(range(1, 21)) and all(math.isfinite(v) for v in first.values())
    assert first[20] < first[1]
    weights = checkpoint_weights(run / "checkpoints" / "step_00000020")
    assert all(t.dtype == torch.float32 for t in weights.values())  # fp32 master weights under bf16 autocast
    (run / "checkpoints" / "step_00000020").rename(tmp_path / "moved")
    result = train(1, run, tiny_data, *steps)
    assert "resumed from" in result.stdout + result.stderr
    again = losses(run)
    for step in range(11, 21):
        assert again[step] == pytest.approx(first[step], rel=2e-2), step


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs two GPUs (one rank per GPU)")
def test_nccl_dp2_gives_the_single_gpu_losses(tmp_path, tiny_data):
    """Twin: test_distributed.py::test_same_losses_on_one_process_dp2_tp2_and_dp4 (gloo)."""
    steps = [*ON_GPU, "train.max_steps=10"]
    single, dp2 = tmp_path / "single", tmp_path / "dp2"
    train(1, single, tiny_data, *steps)
    train(2, dp2, tiny_data, *steps)
    for step, loss in losses(single).items():
        assert losses(dp2)[step] == pytest.approx(loss, rel=2e-2), step


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs two GPUs (one rank per GPU)")
def test_nccl_dp2_resumes(tmp_path, tiny_data):
    """Twin: test_training_core.py::test_a_device_backend_string_group_reduces_cpu_tensors (the backend choice).
    Issue 15's first defect: a resume verifies the checkpoint with CPU-tensor collectives, which crashed on an
    NCCL-only group ("No backend type associated with device type cpu") on every multi-GPU resume."""
    steps = [*ON_GPU, "train.max_steps=20", "checkpoint.every=10", "checkpoint.keep_last=3"]
    run = tmp_path / "run"
    train(2, run, tiny_data, *steps)
    first = losses(run)
    (run / "checkpoints" / "step_00000020").rename(tmp_path / "moved")
    result = train(2, run, tiny_data, *steps)
    assert "resumed from" in result.stdout + result.stderr
    again = losses(run)
    for step in range(11, 21):
        assert again[step] == pytest.approx(first[step], rel=2e-2), step


def test_async_save_copies_on_its_own_stream_before_the_weights_change(tmp_path):
    """Twin: test_checkpoint_files.py::test_async_save_keeps_its_steps_state_when_the_weights_change_after_wait_staged.
    On the GPU the copy into pinned memory runs on a side stream, ordered after the step that produced the
    weights; after wait_staged() the optimizer may change them and the checkpoint still holds the saved step."""
    from model.config import GPTConfig
    from model.gpt import GPT
    from training.async_checkpoint import AsyncSaver
    from training.checkpoint import find_resumable, load_checkpoint

    def fresh():
        m = GPT(GPTConfig(vocab_size=4096, n_layer=4, n_head=8, d_model=512, max_seq_len=64)).cuda()
        m.init_weights(seed=0)
        return m, torch.optim.AdamW(m.parameters(), fused=True)

    model, opt = fresh()
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()  # queued on the default stream: the saver's copy must wait for it
    saver = AsyncSaver(torch.device("cuda"))
    try:
        saver.save(tmp_path / "run", 1, model, opt, {"step": 1}, 2, 0)
        expected = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        saver.wait_staged()
        opt.step()
        saved = saver.wait()
    finally:
        saver.close()
    assert saved == find_resumable(tmp_path / "run")
    other, other_opt = fresh()
    load_checkpoint(saved, other, other_opt)
    assert all(torch.equal(other.state_dict()[k].cpu(), v) for k, v in expected.items())


def test_kv_cache_gives_the_uncached_tokens_on_the_gpu():
    """Twin: test_generate.py::test_kv_cache_gives_the_same_greedy_tokens_batched_over_different_lengths."""
    from model.config import GPTConfig
    from model.generate import generate
    from model.gpt import GPT

    model = GPT(
        GPTConfig(vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, d_model=32, max_seq_len=48, tie_embeddings=False)
    )
    model.init_weights(seed=0)
    with torch.no_grad():
        model.output.weight.mul_(20)
    model = model.cuda().eval()
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14, 15, 16], [3]]
    got = generate(model, prompts, 20, temperature=0)
    for prompt, tokens in zip(prompts, got):
        seq = list(prompt)
        with torch.no_grad():
            for _ in range(20):
                seq.append(int(model(torch.tensor([seq], device="cuda"))[0, -1].argmax()))
        assert tokens == seq[len(prompt) :]
