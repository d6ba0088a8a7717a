"""Near-duplicate clustering (training/data/curate/clusters.py) on real MinHash signatures of near copies: who is
kept, and that the work grows linearly with the number of copies of one template (counted comparisons of
signature rows, not wall time, so the test cannot flake)."""

from __future__ import annotations

import numpy as np

from bench.data_curation import JOB, all_pairs, near_copy_signatures, template_file
from jobspec import load_spec
from training.data.curate.clusters import near_duplicates

NEAR = load_spec(JOB, []).curate.near_dedup


class CountingRows(np.ndarray):
    """Signatures that count how many signature rows are compared (np.equal between rows), however the
    clustering slices them."""

    compared = 0

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        def plain(xs):
            return tuple(x.view(np.ndarray) if isinstance(x, CountingRows) else x for x in xs)

        if "out" in kwargs:
            kwargs["out"] = plain(kwargs["out"])
        out = getattr(ufunc, method)(*plain(inputs), **kwargs)
        if ufunc is np.equal and np.ndim(out) >= 2:  # (..., num_perm): one comparison per pair of rows
            CountingRows.compared += int(np.prod(np.shape(out)[:-1]))
        return out.view(CountingRows) if isinstance(out, np.ndarray) else out


def comparisons(sigs: np.ndarray) -> int:
    CountingRows.compared = 0
    near_duplicates(sigs.view(CountingRows), NEAR.bands, NEAR.threshold)
    return CountingRows.compared


def test_near_copies_of_one_template_cost_linear_comparisons():
    sigs = near_copy_signatures(template_file().read_text(), 1600, NEAR)
    small, large = comparisons(sigs[:200]), comparisons(sigs[:1600])
    # 8x the copies: linear work is ~8x the comparisons, comparing every pair of a bucket ~64x
    assert large / small < 12, (small, large)
    assert large <= 2 * NEAR.bands * 1600, (small, large)  # a few per copy and band, not one per earlier copy


def test_clusters_lie_within_those_of_comparing_every_pair():
    """Near copies of one template (never itself in the corpus: copies of copies, some below the threshold with
    each other) and of a second one: each cluster is part of one that comparing every pair of a bucket finds, and
    hardly any copy is kept that it removes."""
    from training.data.corpus import demo_files

    second = next(p for p in sorted(demo_files("train")) if 4_000 <= p.stat().st_size <= 8_000)
    sigs = np.concatenate(
        [
            near_copy_signatures(template_file().read_text(), 200, NEAR, seed=2),
            near_copy_signatures(second.read_text(), 80, NEAR, seed=3),
        ]
    )
    sigs = sigs[np.random.default_rng(0).permutation(len(sigs))]  # the two families interleaved
    ours, every_pair = near_duplicates(sigs, NEAR.bands, NEAR.threshold), all_pairs(sigs, NEAR.bands, NEAR.threshold)
    assert np.all(every_pair[ours] == every_pair), "a cluster spans two of comparing every pair's"
    kept, kept_every_pair = (ours == np.arange(len(sigs))).sum(), (every_pair == np.arange(len(sigs))).sum()
    assert kept_every_pair <= kept <= kept_every_pair + 2, (kept, kept_every_pair)


def test_copies_join_their_template_and_other_documents_stay():
    """Two templates first, then 40 near copies of each (3% of lines rewritten), then 60 unrelated files: every
    copy names its own template (what comparing every pair gave too), nothing else is removed."""
    from training.data.corpus import demo_files

    files = [p for p in sorted(demo_files("train")) if "encodings" not in p.parts and p.stat().st_size >= 2_000]
    templates, others = files[:2], files[2:62]  # encodings/: the standard library's own near-copy family
    copies = [near_copy_signatures(t.read_text(), 40, NEAR, seed=k) for k, t in enumerate(templates)]
    sigs = np.concatenate([signatures_of(templates), *copies, signatures_of(others)])
    roots = near_duplicates(sigs, NEAR.bands, NEAR.threshold)
    assert list(roots[:2]) == [0, 1]
    assert np.all(roots[2:42] == 0) and np.all(roots[42:82] == 1)
    assert np.all(roots[82:] == np.arange(82, len(sigs)))


def signatures_of(paths) -> np.ndarray:
    from training.data.curate.minhash import ngram_hashes, signatures, unit_hashes

    shingles = [ngram_hashes(unit_hashes(p.read_text(), NEAR.unit), NEAR.ngram) for p in paths]
    return signatures(shingles, NEAR.num_perm, NEAR.seed)
