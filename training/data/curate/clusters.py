"""The cross-shard half of deduplication: which documents are copies of which, over every shard at once.

Input is small per document (a 128-bit content hash, a MinHash signature, the global order), so one process
holds the whole corpus' index. In each group of copies the document first in reading order is kept; the
others name it in removed.jsonl.

Exact: documents with the same content hash. Near: documents sharing an LSH band key are candidates; a
candidate joins a cluster of its bucket when its signature agrees on at least `threshold` of its rows (the
Jaccard estimate) with the cluster's first member in the bucket (its representative there: the document kept,
when that shares the bucket) or, failing that, with one of a few of its next members there (PROBES); clusters
merge (union-find) when a member of one is similar to another's. A pair already in one cluster is never
compared, so a bucket of n near copies of one template costs about n comparisons, not the n^2 / 2 of comparing
every pair. Each join is a similar pair of one bucket, which comparing every pair would join too, so each
cluster lies within one of the connected components that would give; a chain of near copies (A ~ B ~ C,
A !~ C) is one cluster when C is similar to one of the members it is compared with.
"""

from __future__ import annotations

import numpy as np

from training.data.curate.minhash import band_keys

PROBES = 8  # members of a cluster a candidate is compared with when its representative is not similar to it


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

    def find_all(self, xs: np.ndarray) -> np.ndarray:
        """find() of many rows at once (their roots), compressing their paths."""
        roots = self.parent[xs]
        while True:
            up = self.parent[roots]
            if np.array_equal(up, roots):
                break
            roots = up
        self.parent[xs] = roots
        return roots

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
    return uf.find_all(np.arange(n))


def _join_bucket(uf: UnionFind, sigs: np.ndarray, members: np.ndarray, threshold: float) -> None:
    """Members join the cluster of the bucket's first member when they agree with that member (the cluster's
    representative here) or, failing that, with one of the cluster's next PROBES members in this bucket; those left
    start over with the next cluster. Members already in that cluster are not compared again, so a bucket of n
    near copies costs at most (1 + PROBES) n comparisons, not n^2 / 2."""
    while len(members) > 1:
        roots = uf.find_all(members)
        rep, same = members[0], roots == roots[0]
        others = members[~same]
        if len(others) == 0:
            return
        similar = (sigs[others] == sigs[rep]).mean(axis=1) >= threshold
        joined, rest = np.concatenate([members[same], others[similar]]), others[~similar]
        probes = joined[joined != rep][:PROBES]
        if len(rest) and len(probes):  # a copy of a copy: similar to a member, not to the representative
            near_probe = ((sigs[rest][:, None] == sigs[probes][None]).mean(axis=2) >= threshold).any(axis=1)
            joined, rest = np.concatenate([joined, rest[near_probe]]), rest[~near_probe]
        for i in joined:
            uf.union(int(i), int(rep))
        members = rest
