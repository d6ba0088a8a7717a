"""Muon's orthogonalization shared out over the ranks that shard the matrices (FSDP2's Shard(0) rows).

Newton-Schulz needs a whole matrix. Rather than every rank gathering every matrix and repeating the work, the
matrices go in rounds of N (the shard group's size): in a round, matrix j belongs to rank j. One all-to-all sends
each rank's row shards to the owners, each owner orthogonalizes its matrix, and a second all-to-all sends every
rank its rows of each result. Per rank: 1/N of the FLOPs, and each matrix's bytes cross the wire twice, once
each way, in bf16 (Newton-Schulz casts to bf16 first, so sending bf16 changes nothing in the result).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard


def row_shard_dim(t: torch.Tensor) -> Optional[int]:
    """The mesh dimension a DTensor's rows are sharded over, when that is its only sharding; else None."""
    if not isinstance(t, DTensor):
        return None
    shards = [i for i, p in enumerate(t.placements) if isinstance(p, Shard)]
    if len(shards) != 1 or t.placements[shards[0]] != Shard(0):
        return None
    if not all(isinstance(p, (Shard, Replicate)) for p in t.placements):
        return None  # partial sums: not a matrix's rows yet
    return shards[0]


def rows_per_rank(rows: int, n: int) -> list[int]:
    """How Shard(0) splits `rows` over n ranks (torch.chunk's rule: ceil-sized pieces, the last ones short or empty)."""
    size = -(-rows // n)
    return [max(0, min(size, rows - i * size)) for i in range(n)]


def orthogonalize_sharded(
    updates: list[DTensor], newton_schulz: Callable[[torch.Tensor], torch.Tensor]
) -> list[DTensor]:
    """Each update's orthogonalization, as a DTensor of the same layout; every update on the same mesh dimension."""
    mesh, dim = updates[0].device_mesh, row_shard_dim(updates[0])
    group, n, me = mesh.get_group(dim), mesh.size(dim), mesh.get_local_rank(dim)
    results = []
    for start in range(0, len(updates), n):
        round_ = updates[start : start + n]
        shards = [u.to_local().bfloat16() for u in round_]
        splits = [rows_per_rank(u.shape[0], n) for u in round_]
        cols = [u.shape[1] for u in round_]
        # to each owner j, my rows of matrix j; from every rank i, its rows of mine
        send = torch.cat([s.reshape(-1) for s in shards])
        send_sizes = [s.numel() for s in shards] + [0] * (n - len(round_))
        mine = me < len(round_)
        recv_sizes = [r * cols[me] for r in splits[me]] if mine else [0] * n
        recv = send.new_empty(sum(recv_sizes))
        dist.all_to_all_single(recv, send, recv_sizes, send_sizes, group=group)
        # my matrix, whole, orthogonalized; then to each rank i its rows of it
        back = newton_schulz(recv.view(-1, cols[me])).contiguous().reshape(-1) if mine else recv
        out_sizes = [s.numel() for s in shards] + [0] * (n - len(round_))
        out = send.new_empty(sum(out_sizes))
        dist.all_to_all_single(out, back, out_sizes, recv_sizes, group=group)
        for u, piece in zip(round_, out.split(out_sizes[: len(round_)])):
            local = piece.view(u.to_local().shape).to(u.dtype)
            results.append(
                DTensor.from_local(local, mesh, u.placements, run_check=False, shape=u.shape, stride=u.stride())
            )
    return results
