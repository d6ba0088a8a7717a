"""Attention within packed documents: each token attends causally to the tokens of its own document only.

Packed rows carry doc_ids [batch, seq] (0, 1, ... per document, never decreasing along a row). Two forms of
the same mask:

    dense_document_mask(doc_ids)   a bool [batch, 1, seq, seq] for SDPA: memory grows as seq squared, and
                                   an explicit mask rules out the flash kernels
    document_block_mask(doc_ids)   a flex_attention BlockMask built from the ids at the granularity of
                                   128 x 128 tiles: the kernel skips tiles between documents and above the
                                   diagonal, and nothing of size seq x seq is ever allocated

`document_attention_mask` picks the one a device can train with: flex_attention has no backward on CPUs,
so CPU runs keep the dense mask (at the short sequences CPUs train, it costs little).
"""

from __future__ import annotations

import functools

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

TILE = 128  # flex_attention's default block size


def dense_document_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """Attention mask [batch, 1, seq, seq]: True where query t may attend key s, i.e. s <= t and both are in
    the same document."""
    seq = doc_ids.size(-1)
    causal = torch.ones(seq, seq, dtype=torch.bool, device=doc_ids.device).tril()
    same = doc_ids.unsqueeze(-1) == doc_ids.unsqueeze(-2)
    return (same & causal).unsqueeze(1)


def document_block_mask(doc_ids: torch.Tensor, tile: int = TILE) -> BlockMask:
    """The same mask as a BlockMask, its tiles classified from each tile's first and last document id."""
    batch, seq = doc_ids.shape
    tiles = -(-seq // tile)
    # Whole tiles: the padding is one more document, so the mask function never reads past the ids.
    ids = torch.cat([doc_ids, (doc_ids[:, -1:] + 1).expand(batch, tiles * tile - seq)], dim=1)
    first, last = ids.view(batch, tiles, tile)[..., 0], ids.view(batch, tiles, tile)[..., -1]  # per tile
    q_first, q_last, k_first, k_last = first[:, :, None], last[:, :, None], first[:, None, :], last[:, None, :]
    at_or_below = torch.ones(tiles, tiles, dtype=torch.bool, device=doc_ids.device).tril()
    # A key tile at or before the query tile starts at or before its first document (ids never decrease):
    # they share a document iff the query tile's first document reaches back into the key tile.
    shared = at_or_below & (q_first <= k_last)
    # Every pair of a tile below the diagonal whose tokens are all of one document may attend: no mask needed.
    whole = at_or_below.tril(-1) & (q_first == q_last) & (k_first == k_last) & (q_first == k_first)

    def mask_mod(b, h, q, kv):
        return (kv <= q) & (ids[b, q] == ids[b, kv])

    return BlockMask.from_kv_blocks(
        *_kv_blocks(shared & ~whole), *_kv_blocks(whole), BLOCK_SIZE=tile, mask_mod=mask_mod, seq_lengths=(seq, seq)
    )


def _kv_blocks(tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[batch, q tiles, kv tiles] bool -> BlockMask's (kv tiles per query tile, their indices first), one head."""
    counts = tiles.sum(-1, dtype=torch.int32)
    order = torch.argsort(tiles.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    return counts[:, None], order[:, None]


def flex_can_train(device: torch.device, head_dim: int) -> bool:
    """flex_attention's backward runs on GPUs only, and its kernels want a power-of-two head size of 16 or more."""
    return device.type == "cuda" and head_dim >= 16 and head_dim & (head_dim - 1) == 0


def document_attention_mask(doc_ids: torch.Tensor, head_dim: int) -> torch.Tensor | BlockMask:
    """The mask a GPT takes for packed rows: a BlockMask where flex_attention can train, else the dense one."""
    if flex_can_train(doc_ids.device, head_dim):
        return document_block_mask(doc_ids)
    return dense_document_mask(doc_ids)


def flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs) -> torch.Tensor:
    """flex_attention as one fused kernel: uncompiled, it would build the whole score matrix. Inside a block
    that train.compile compiled, that compilation covers it."""
    if torch.compiler.is_compiling():
        return flex_attention(q, k, v, **kwargs)
    return _compiled_flex()(q, k, v, **kwargs)


@functools.cache
def _compiled_flex():
    return torch.compile(flex_attention, dynamic=False)
