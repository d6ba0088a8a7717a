"""Near deduplication's per-document half: n-gram shingles, MinHash signatures, LSH band keys.

Units are runs of letters, digits and '_' (unit: word), or those and every other non-space character
(unit: token), lowercased; a shingle is n consecutive units, hashed to 64 bits. The signature (num_perm
minima of permuted shingle hashes) is computed by rensa, in Rust: 18x faster than the same in numpy here
(docs/data.md). Band b's key hashes rows b*r .. b*r+r-1 of the signature; two documents whose keys agree in
one band become candidates, which clusters.py verifies against the threshold.
"""

from __future__ import annotations

import re

import numpy as np
import xxhash

UNITS = {"word": re.compile(r"\w+"), "token": re.compile(r"\w+|[^\w\s]")}
_MULT = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit constant (golden ratio): a polynomial hash of n unit hashes


def unit_hashes(text: str, unit: str) -> np.ndarray:
    units = UNITS[unit].findall(text.lower())
    return np.fromiter(map(xxhash.xxh3_64_intdigest, units), np.uint64, len(units))


def ngram_hashes(units: np.ndarray, n: int) -> np.ndarray:
    """Hashes of every run of n consecutive units (a shorter document: one run of all its units), unique."""
    if len(units) == 0:
        return units
    n = min(n, len(units))
    count = len(units) - n + 1
    out = np.zeros(count, np.uint64)
    with np.errstate(over="ignore"):  # wrapping multiplication is the hash
        for k in range(n):
            out = out * _MULT + units[k : k + count]
    return np.unique(out)


def signatures(shingle_sets: list[np.ndarray], num_perm: int, seed: int) -> np.ndarray:
    """(documents, num_perm) uint32 MinHash signatures. A document with no shingles gets an all-max row, which
    the caller must not index (clusters.py skips documents without shingles)."""
    import rensa

    if not shingle_sets:
        return np.zeros((0, num_perm), np.uint32)
    flat = np.concatenate(shingle_sets)
    offsets = np.zeros(len(shingle_sets) + 1, np.uint64)
    np.cumsum([len(s) for s in shingle_sets], out=offsets[1:])
    matrix = rensa.RMinHash.digest_matrix_from_flat_token_hashes(flat, offsets, num_perm, seed)
    return np.asarray(matrix.to_rows(), dtype=np.uint32).reshape(len(shingle_sets), num_perm)


def band_keys(sigs: np.ndarray, bands: int) -> np.ndarray:
    """(documents, bands) uint64: one hash per band of rows = num_perm / bands signature values."""
    rows = sigs.shape[1] // bands
    blocks = sigs[:, : rows * bands].reshape(len(sigs), bands, rows).astype(np.uint64)
    keys = np.zeros((len(sigs), bands), np.uint64)
    with np.errstate(over="ignore"):
        for j in range(rows):
            keys = keys * _MULT + blocks[:, :, j]
        keys ^= np.arange(bands, dtype=np.uint64) * _MULT  # equal rows in different bands are different keys
    return keys
