"""The cross-shard half of deduplication: which documents are copies of which, over every shard at once.

Input is small per document (a 128-bit content hash, a MinHash signature, the global order), so one process
holds the whole corpus' index. In each group of copies the document first in reading order is kept; the
others name it in removed.jsonl.

Exact: documents with the same content hash. Near: documents sharing an LSH band key are candidates; a
candidate joins the first earlier member of its bucket whose signatures agree on at least `threshold` of
their rows (the Jaccard estimate), and clusters are the connected components (union-find), so a chain of
near copies is one cluster.
"""

from __future__ import annotations

import numpy as np

from training.data.curate.minhash import band_keys


class UnionFind:
    def __init__(self, n: int):
        self.parent = np.arange(n)

    def find(self, x: int) -> int:
        root = x
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[x] != root:  # path compression
            self.parent[x], x = root, self.parent[x]
        return int(root)

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:  # the smaller index (earlier in reading order) is the root: the one kept
            self.parent[max(ra, rb)] = min(ra, rb)


def exact_duplicates(hashes: np.ndarray) -> np.ndarray:
    """hashes: (n, 2) uint64 in reading order. Returns, per row, the row it duplicates (itself if first)."""
    n = len(hashes)
    if n == 0:
        return np.zeros(0, np.int64)
    order = np.lexsort((np.arange(n), hashes[:, 1], hashes[:, 0]))  # by hash, then by reading order
    sorted_h = hashes[order]
    new_group = np.ones(n, bool)
    new_group[1:] = np.any(sorted_h[1:] != sorted_h[:-1], axis=1)
    first_of_group = order[np.maximum.accumulate(np.where(new_group, np.arange(n), 0))]
    keep = np.empty(n, np.int64)
    keep[order] = first_of_group
    return keep


def near_duplicates(sigs: np.ndarray, bands: int, threshold: float) -> np.ndarray:
    """sigs: (n, num_perm) uint32 in reading order. Returns, per row, the row kept for its cluster."""
    n = len(sigs)
    uf = UnionFind(n)
    keys = band_keys(sigs, bands)
    for b in range(bands):
        order = np.argsort(keys[:, b], kind="stable")  # stable: reading order within a bucket
        k = keys[order, b]
        starts = np.flatnonzero(np.r_[True, k[1:] != k[:-1]])
        ends = np.r_[starts[1:], n]
        for s, e in zip(starts, ends):
            if e - s > 1:
                _join_bucket(uf, sigs, order[s:e], threshold)
    return np.array([uf.find(i) for i in range(n)], np.int64)


def _join_bucket(uf: UnionFind, sigs: np.ndarray, members: np.ndarray, threshold: float) -> None:
    """Each member joins every earlier member whose estimated Jaccard similarity reaches the threshold."""
    block = sigs[members]
    for j in range(1, len(members)):
        similar = np.flatnonzero((block[:j] == block[j]).mean(axis=1) >= threshold)
        for i in similar:
            uf.union(int(members[i]), int(members[j]))
