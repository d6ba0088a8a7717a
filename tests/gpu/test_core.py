"""GPU forms of issue 15's training-core decisions (`python -m pytest tests/gpu`, run by bench/gpu_session.sh).

Each test names its CPU twin, which runs in CI. What only a GPU can show: GPU memory (an async save's staging,
the memory plan's peaks), flex_attention's backward, NCCL with tensor parallelism.
"""

from __future__ import annotations

import gc
from contextlib import contextmanager, nullcontext

import pytest
import torch
import torch.distributed as dist

from model.config import GPTConfig
from model.gpt import GPT

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
GIB = 2**30


@contextmanager
def one_gpu_group(tmp_path):
    """A one-rank process group and a one-GPU mesh: FSDP2 then holds the state as DTensors, as on a cluster."""
    from torch.distributed.device_mesh import init_device_mesh

    from training.distributed import process_group_backend

    torch.cuda.set_device(0)
    dist.init_process_group(
        process_group_backend(use_cuda=True), init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1
    )
    try:
        yield init_device_mesh("cuda", (1,))
    finally:
        dist.destroy_process_group()


def fsdp_model(cfg: GPTConfig, mesh, activation_checkpointing: bool = False) -> GPT:
    from model.parallelize import apply_activation_checkpointing, apply_fsdp

    with torch.device("meta"):
        model = GPT(cfg)
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    apply_fsdp(model, mesh, torch.bfloat16)
    model.to_empty(device="cuda")
    model.init_weights(seed=0)
    return model


def freed() -> None:
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


# ---------------------------------------------------------------- item 3: async staging stays on the host


def test_async_save_adds_under_5_percent_to_peak_gpu_memory(tmp_path):
    """Twins: test_training_core.py::test_staging_keeps_the_copy_on_the_host_whatever_the_meshs_device and
    ::test_async_save_of_fsdp_shards_stages_host_copies_that_load_back_equal. The staged copy of the weights and
    moments lives in pinned host memory only (DTensor.from_local used to move it back onto the GPU: +100%)."""
    from training.async_checkpoint import AsyncSaver
    from training.checkpoint import load_checkpoint

    cfg = GPTConfig(vocab_size=8192, n_layer=8, n_head=16, d_model=1024, max_seq_len=128, tie_embeddings=False)
    with one_gpu_group(tmp_path) as mesh:
        model = fsdp_model(cfg, mesh)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
        model(torch.randint(0, 8192, (2, 128), device="cuda")).float().square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        expected = {k: v.full_tensor().cpu() for k, v in model.state_dict().items()}
        freed()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        saver = AsyncSaver(torch.device("cuda"))
        try:
            saver.save(tmp_path / "run", 1, model, optimizer, {"step": 1}, 2, 0)
            saved = saver.wait()
        finally:
            saver.close()
        torch.cuda.synchronize()
        growth = torch.cuda.max_memory_allocated() - before
        assert before > 1.2 * GIB  # 118M parameters: fp32 weights and two moments
        assert growth < 0.05 * before, (
            f"an async save took {growth / GIB:.2f} GiB of GPU memory over {before / GIB:.2f}"
        )
        other = fsdp_model(cfg, mesh)
        load_checkpoint(saved, other, torch.optim.AdamW(other.parameters(), fused=True))
        for k, v in other.state_dict().items():
            assert torch.equal(v.full_tensor().cpu(), expected[k]), k


# ---------------------------------------------------------------- item 6: packed documents through flex_attention


def test_packed_rows_train_through_flex_attention_with_the_dense_masks_loss_and_gradients():
    """Twin: test_attention.py::test_packed_rows_give_the_dense_masks_losses_through_flex_attention (the forward:
    flex_attention has no backward on CPUs). On a GPU SFT packs with the BlockMask; its gradients are the dense
    mask's."""
    from torch.nn.attention.flex_attention import BlockMask

    from model.document_attention import dense_document_mask, document_attention_mask
    from model.parallelize import token_cross_entropy
    from tests.test_attention import packed_doc_ids, packed_positions

    cfg = GPTConfig(vocab_size=512, n_layer=2, n_head=4, n_kv_head=2, d_model=256, max_seq_len=1024)  # head_dim 64
    model = GPT(cfg).cuda()
    model.init_weights(seed=0)
    doc_ids = packed_doc_ids(2, 1024, seed=1).cuda()
    positions = packed_positions(doc_ids)
    gen = torch.Generator().manual_seed(0)
    tokens, labels = (torch.randint(0, 512, (2, 1024), generator=gen).cuda() for _ in range(2))
    block_mask = document_attention_mask(doc_ids, cfg.head_dim)
    assert isinstance(block_mask, BlockMask)  # what SFT hands the model on a GPU
    results = []
    for mask in (dense_document_mask(doc_ids), block_mask):
        loss = token_cross_entropy(model(tokens, positions, mask), labels, reduction="sum")
        loss.backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}))
        model.zero_grad(set_to_none=True)
    (dense_loss, dense_grads), (flex_loss, flex_grads) = results
    assert flex_loss == pytest.approx(dense_loss, rel=1e-4)
    for name, grad in dense_grads.items():
        torch.testing.assert_close(flex_grads[name], grad, rtol=1e-3, atol=1e-4, msg=name)


# ---------------------------------------------------------------- item 7: grouped-query attention on the GPU


def test_grouped_query_attention_gives_the_multi_head_models_tokens_on_the_gpu():
    """Twin: test_attention.py::test_grouped_query_attention_gives_the_multi_head_models_tokens."""
    from model.generate import generate
    from tests.test_attention import PROMPTS, as_multi_head, gqa_model

    gqa = gqa_model()
    mha = as_multi_head(gqa).cuda()
    gqa = gqa.cuda()
    assert generate(gqa, PROMPTS, 20, temperature=0) == generate(mha, PROMPTS, 20, temperature=0)


# ---------------------------------------------------------------- items 4 and 5: tensor parallel alone, bf16, NCCL


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="tensor parallelism over NCCL needs two GPUs")
def test_nccl_tp2_in_bf16_gives_the_single_gpu_losses(tmp_path, tiny_data):
    """Twins: test_training_core.py::test_tensor_parallel_alone_takes_bf16_from_autocast_on_gpus and
    ::test_loss_on_vocabulary_sharded_logits_equals_the_whole_logits_loss. tp=2, dp=1: bf16 from autocast, the
    loss on vocabulary-sharded logits."""
    from tests.test_distributed import losses, train

    steps = ["train.device=cuda", "train.dtype=bf16", "train.max_steps=10"]
    single, tp2 = tmp_path / "single", tmp_path / "tp2"
    train(1, single, tiny_data, *steps)
    train(2, tp2, tiny_data, *steps, tp=2)
    for step, loss in losses(single).items():
        assert losses(tp2)[step] == pytest.approx(loss, rel=2e-2), step


# ---------------------------------------------------------------- the memory plan against the allocator


def measured_peak(model, autocast, vocab: int, seq: int) -> int:
    """Peak bytes allocated over two training steps after the first (when AdamW's moments exist), as the trainer
    steps: the loss summed over tokens, backward, clipping, fused AdamW, gradients set to None."""
    from model.parallelize import token_cross_entropy

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    tokens = torch.randint(0, vocab, (1, seq + 1), device="cuda")

    def step():
        with autocast:
            loss = token_cross_entropy(model(tokens[:, :-1]), tokens[:, 1:], reduction="sum")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def one_gpu_model(cfg: GPTConfig, activation_checkpointing: bool) -> GPT:
    """As the trainer builds it on one GPU: no FSDP, fp32 weights, bf16 from autocast."""
    from model.parallelize import parallelize

    with torch.device("meta"):
        model = GPT(cfg)
    parallelize(model, None, param_dtype=torch.float32, activation_checkpointing=activation_checkpointing)
    model.to_empty(device="cuda")
    model.init_weights(seed=0)
    return model


@pytest.mark.parametrize("size, activation_checkpointing", [("125m", False), ("125m", True), ("1.3b", False)])
def test_memory_plan_matches_the_measured_peak_on_one_gpu(size, activation_checkpointing):
    """Twin: tests/test_memory_plan.py (the parameter counts and a block's saved activations on the CPU).
    The plan of a one-GPU run (autocast, no FSDP) at seq 2048 within 20% of torch.cuda.max_memory_allocated."""
    from bench.memory_plan import plan
    from model.config import SIZES

    cfg, seq = SIZES[size], 2048
    cfg = GPTConfig(**{**cfg.__dict__, "max_seq_len": seq})
    freed()
    peak = measured_peak(
        one_gpu_model(cfg, activation_checkpointing), torch.autocast("cuda", dtype=torch.bfloat16), cfg.vocab_size, seq
    )
    freed()
    planned = plan(cfg, seq, dp=1, tp=1, activation_checkpointing=activation_checkpointing)
    detail = ", ".join(f"{k} {v / GIB:.2f}" for k, v in planned.items())
    assert 0.8 < peak / planned["peak"] < 1.2, f"{size}: measured {peak / GIB:.2f} GiB; planned {detail} GiB"


def test_memory_plan_matches_the_measured_peak_under_fsdp(tmp_path):
    """The plan's FSDP arithmetic (bf16 parameters gathered per block, the root's held) on a one-GPU mesh."""
    from bench.memory_plan import plan
    from model.config import SIZES

    cfg, seq = GPTConfig(**{**SIZES["125m"].__dict__, "max_seq_len": 2048}), 2048
    freed()
    with one_gpu_group(tmp_path) as mesh:
        peak = measured_peak(fsdp_model(cfg, mesh), nullcontext(), cfg.vocab_size, seq)
    freed()
    planned = plan(cfg, seq, dp=1, tp=1, fsdp=True)
    detail = ", ".join(f"{k} {v / GIB:.2f}" for k, v in planned.items())
    assert 0.8 < peak / planned["peak"] < 1.2, f"measured {peak / GIB:.2f} GiB; planned {detail} GiB"
