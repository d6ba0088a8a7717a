"""Attention that scales gives what the plain paths give: grouped-query attention reading the KV heads in place
(SDPA's enable_gqa, no copy of the cache per decoding step), and packed documents through flex_attention with a
BlockMask built from the documents' ids instead of a dense [batch, 1, seq, seq] mask."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask
from torch.utils._python_dispatch import TorchDispatchMode

from model.config import GPTConfig
from model.document_attention import (
    dense_document_mask,
    document_attention_mask,
    document_block_mask,
    flex_can_train,
)
from model.generate import generate
from model.gpt import GPT

PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14, 15, 16], [3]]  # different lengths: a padding mask too


def gqa_model() -> GPT:
    model = GPT(
        GPTConfig(vocab_size=97, n_layer=2, n_head=8, n_kv_head=2, d_model=64, max_seq_len=64, tie_embeddings=False)
    )
    model.init_weights(seed=0)
    with torch.no_grad():  # sharper logits: greedy choices far from ties
        model.output.weight.mul_(20)
    return model.eval()


def as_multi_head(gqa: GPT) -> GPT:
    """The same model with every key/value head written out once per query head that reads it: the plainest
    reference for what grouped-query attention must compute."""
    cfg = gqa.cfg
    mha = GPT(GPTConfig(**{**cfg.__dict__, "n_kv_head": cfg.n_head}))
    group = cfg.n_head // cfg.kv_heads
    state = gqa.state_dict()
    for i in range(cfg.n_layer):
        for name in ("wk", "wv"):
            key = f"layers.{i}.attention.{name}.weight"
            heads = state[key].view(cfg.kv_heads, cfg.head_dim, cfg.d_model)
            state[key] = heads.repeat_interleave(group, dim=0).reshape(-1, cfg.d_model)
    mha.load_state_dict(state)
    return mha.eval()


class AttentionCalls(TorchDispatchMode):
    """The key/value shapes every attention kernel was called with."""

    def __init__(self):
        super().__init__()
        self.kv_heads: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "scaled_dot_product" in str(func):
            self.kv_heads.append(args[1].shape[1])
        return func(*args, **(kwargs or {}))


def test_grouped_query_attention_gives_the_multi_head_models_tokens():
    gqa = gqa_model()
    mha = as_multi_head(gqa)
    tokens = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])
    with torch.no_grad():
        torch.testing.assert_close(gqa(tokens), mha(tokens), rtol=1e-5, atol=1e-5)
    got = generate(gqa, PROMPTS, 20, temperature=0)
    assert got == generate(mha, PROMPTS, 20, temperature=0)
    assert got == generate(gqa, PROMPTS, 20, temperature=0, use_cache=False)


def test_decoding_reads_the_cached_kv_heads_without_copying_them():
    """Every attention call gets the cache's 2 key/value heads as they are, not 8 copies made per step
    (repeat_interleave copied the whole cache of every layer for every new token)."""
    with AttentionCalls() as calls:
        generate(gqa_model(), PROMPTS, 10, temperature=0)
    assert len(calls.kv_heads) == 2 * 10  # 2 layers x 10 steps
    assert set(calls.kv_heads) == {2}


# ---------------------------------------------------------------- packed documents


def packed_doc_ids(batch: int, seq: int, seed: int) -> torch.Tensor:
    """Rows of documents of random lengths, from a few tokens to several 128-token tiles, the last cut at seq."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        ids, doc = [], 0
        while len(ids) < seq:
            length = int(torch.randint(1, 12 if doc % 3 == 1 else 600, (1,), generator=gen))
            ids += [doc] * length
            doc += 1
        rows.append(ids[:seq])
    return torch.tensor(rows)


def packed_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """Rotary positions that restart at 0 with each document, as training/posttrain/chat.py packs them."""
    return torch.stack(
        [
            torch.cat([torch.arange(int(n)) for n in torch.unique_consecutive(row, return_counts=True)[1]])
            for row in doc_ids.cpu()
        ]
    ).to(doc_ids.device)


@pytest.mark.parametrize("seq", [700, 512, 64])
def test_block_mask_tiles_are_those_of_torchs_dense_construction(seq):
    """Built from the ids tile by tile, the BlockMask names the same partial and whole tiles as torch's
    create_block_mask, which evaluates the mask at every (query, key) pair."""
    doc_ids = packed_doc_ids(3, seq, seed=seq)
    ours = document_block_mask(doc_ids)
    theirs = create_block_mask(
        lambda b, h, q, kv: (kv <= q) & (doc_ids[b, q] == doc_ids[b, kv]), 3, None, seq, seq, device="cpu"
    )
    for count, index in (("kv_num_blocks", "kv_indices"), ("full_kv_num_blocks", "full_kv_indices")):
        n_ours, n_theirs = getattr(ours, count), getattr(theirs, count)
        assert torch.equal(n_ours, n_theirs), count
        for b in range(3):
            for i in range(n_ours.shape[-1]):
                k = int(n_ours[b, 0, i])
                assert sorted(getattr(ours, index)[b, 0, i, :k].tolist()) == sorted(
                    getattr(theirs, index)[b, 0, i, :k].tolist()
                ), (count, b, i)
    if seq >= 512:  # these rows have tiles wholly inside one document: the kernel skips their mask
        assert int(ours.full_kv_num_blocks.sum()) > 0


def test_packed_rows_give_the_dense_masks_losses_through_flex_attention():
    """The SFT loss of packed rows through flex_attention (a fused kernel, compiled) equals the dense mask's.
    On CPUs flex_attention has no backward, so this compares the forward; tests/gpu compares gradients."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=256, n_layer=2, n_head=4, n_kv_head=2, d_model=64, max_seq_len=512)).eval()
    model.init_weights(seed=0)
    doc_ids = packed_doc_ids(2, 512, seed=1)
    positions = packed_positions(doc_ids)
    tokens, labels = torch.randint(0, 256, (2, 512)), torch.randint(0, 256, (2, 512))
    with torch.no_grad():
        dense = model(tokens, positions, dense_document_mask(doc_ids))
        flex = model(tokens, positions, document_block_mask(doc_ids))
    torch.testing.assert_close(flex, dense, rtol=1e-4, atol=1e-4)
    loss = [F.cross_entropy(x.view(-1, 256), labels.view(-1), reduction="sum") for x in (dense, flex)]
    assert loss[1].item() == pytest.approx(loss[0].item(), rel=1e-6)


def test_flex_attention_where_it_can_train_and_the_dense_mask_elsewhere():
    assert flex_can_train(torch.device("cuda", 0), head_dim=64)
    assert flex_can_train(torch.device("cuda", 0), head_dim=128)
    assert not flex_can_train(torch.device("cpu"), head_dim=64)  # no backward on CPUs
    assert not flex_can_train(torch.device("cuda", 0), head_dim=8)  # the kernels want 16 or more
    assert not flex_can_train(torch.device("cuda", 0), head_dim=48)  # and a power of two
    doc_ids = packed_doc_ids(2, 64, seed=0)
    assert torch.equal(document_attention_mask(doc_ids, head_dim=64), dense_document_mask(doc_ids))
