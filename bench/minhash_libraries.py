"""How the data curation stage's MinHash library was chosen (docs/data.md): signatures over the demo corpus'
training split, one process, the same word 5-gram shingles for every library, and each library's estimate of the
Jaccard similarity of 50 planted near-copy pairs against the true one.

    python -m bench.minhash_libraries numpy
    python -m bench.minhash_libraries rensa
    # the others are not dependencies of orch (docs/data.md says why): install them aside, e.g.
    pip install --target /tmp/ds datasketch && PYTHONPATH=/tmp/ds python -m bench.minhash_libraries datasketch
    pip install --target /tmp/dt "datatrove[processing]" spacy && PYTHONPATH=/tmp/dt python -m bench.minhash_libraries datatrove
    PYTHONPATH=/tmp/dt python -m bench.minhash_libraries datatrove_filters   # its Gopher/C4/FineWeb filters on code

Prints one JSON line per library; not part of `bench.run` (it needs those installs).
"""
import json
import random
import re
import sys
import time

import numpy as np

from training.data.corpus import demo_files  # noqa: E402

K = 128
N = 5
WORD = re.compile(r"\w+")


def corpus():
    docs = [p.read_bytes().decode("utf-8", "replace") for p in demo_files("train")]
    return docs


def planted(docs, n=100, frac=0.03, seed=0):
    rng = random.Random(seed)
    pairs = []
    for i in rng.sample(range(len(docs)), n):
        lines = docs[i].split("\n")
        for j in rng.sample(range(len(lines)), max(1, int(frac * len(lines)))):
            lines[j] = "# edited " + str(rng.random())
        pairs.append((docs[i], "\n".join(lines)))
    return pairs


def words(text):
    return WORD.findall(text.lower())


def shingle_strings(text):
    w = words(text)
    return [" ".join(w[i:i + N]) for i in range(max(1, len(w) - N + 1))]


_cache = {}


def shingle_hashes(text):
    """Word hashes (blake2b-8, cached per word) combined into 5-gram hashes with a polynomial, in numpy."""
    import hashlib
    w = words(text)
    ids = np.fromiter((_cache.get(x) or _cache.setdefault(x, int.from_bytes(hashlib.blake2b(x.encode(), digest_size=8).digest(), "little")) for x in w), np.uint64, len(w))
    if len(ids) < N:
        return np.unique(ids) if len(ids) else np.zeros(1, np.uint64)
    h = np.zeros(len(ids) - N + 1, np.uint64)
    mult = np.uint64(0x9E3779B97F4A7C15)
    for k in range(N):
        h = h * mult + ids[k:len(ids) - N + 1 + k]
    return np.unique(h)


RNG = np.random.default_rng(1)
A = (RNG.integers(1, 2**63, K, dtype=np.uint64) | np.uint64(1))
B = RNG.integers(0, 2**63, K, dtype=np.uint64)


def numpy_sig(h):
    out = np.full(K, np.iinfo(np.uint32).max, np.uint32)
    for s in range(0, len(h), 4096):
        c = h[s:s + 4096, None]
        out = np.minimum(out, ((c * A + B) >> np.uint64(32)).astype(np.uint32).min(axis=0))
    return out


def true_j(a, b):
    sa, sb = set(shingle_strings(a)), set(shingle_strings(b))
    return len(sa & sb) / len(sa | sb)


def run(lib):
    docs = corpus()
    mb = sum(len(d.encode()) for d in docs) / 1e6
    pairs = planted(docs)
    t0 = time.perf_counter()
    if lib == "numpy":
        hs = [shingle_hashes(d) for d in docs]
        t1 = time.perf_counter()
        sigs = [numpy_sig(h) for h in hs]
        t2 = time.perf_counter()
        est = lambda a, b: float(np.mean(numpy_sig(shingle_hashes(a)) == numpy_sig(shingle_hashes(b))))
    elif lib == "rensa":
        import rensa
        hs = [shingle_hashes(d) for d in docs]
        t1 = time.perf_counter()
        flat = np.concatenate(hs)
        offs = np.concatenate([[0], np.cumsum([len(h) for h in hs])]).astype(np.uint64)
        m = rensa.RMinHash.digest_matrix_from_flat_token_hashes(flat, offs, K, 42)
        t2 = time.perf_counter()
        def est(a, b):
            x, y = rensa.RMinHash(K, 42), rensa.RMinHash(K, 42)
            x.update(shingle_strings(a)); y.update(shingle_strings(b))
            return x.jaccard(y)
        # also: rensa hashing the shingle strings itself (no numpy shingle hashes)
        t3 = time.perf_counter()
        for d in docs:
            r = rensa.RMinHash(K, 42)
            r.update(shingle_strings(d))
            r.digest()
        t4 = time.perf_counter()
        print(json.dumps({"lib": "rensa(strings, per doc)", "seconds": round(t4 - t3, 2), "MB/s": round(mb / (t4 - t3), 2)}))
    elif lib == "datasketch":
        from datasketch import MinHash
        hs = [[s.encode() for s in shingle_strings(d)] for d in docs]
        t1 = time.perf_counter()
        sigs = []
        for h in hs:
            m = MinHash(num_perm=K)
            m.update_batch(h)
            sigs.append(m.hashvalues)
        t2 = time.perf_counter()
        def est(a, b):
            x, y = MinHash(num_perm=K), MinHash(num_perm=K)
            x.update_batch([s.encode() for s in shingle_strings(a)]); y.update_batch([s.encode() for s in shingle_strings(b)])
            return x.jaccard(y)
    elif lib == "datatrove":
        from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupSignature
        step = MinhashDedupSignature(output_folder="/tmp/minhash-libraries-datatrove", config=MinhashConfig(num_buckets=16, hashes_per_bucket=8, n_grams=N))
        try:
            hs = [step.get_shingles(d) for d in docs]
            hs = [h for h in hs if len(h)]
        except Exception as e:
            print(json.dumps({"lib": lib, "error": f"{type(e).__name__}: {str(e)[:300]}"}))
            return
        t1 = time.perf_counter()
        sigs = [step.get_signature(h) for h in hs]
        t2 = time.perf_counter()
        est = None
    elif lib == "datatrove_filters":
        from datatrove.data import Document
        from datatrove.pipeline.filters import GopherQualityFilter, GopherRepetitionFilter, C4QualityFilter, FineWebQualityFilter
        for f in (GopherRepetitionFilter(), GopherQualityFilter(), C4QualityFilter(), FineWebQualityFilter()):
            t = time.perf_counter()
            try:
                kept = sum(1 for i, d in enumerate(docs) if f.filter(Document(text=d, id=str(i))) is True)
                print(json.dumps({"filter": type(f).__name__, "kept": kept, "of": len(docs), "seconds": round(time.perf_counter() - t, 2)}))
            except Exception as e:
                print(json.dumps({"filter": type(f).__name__, "error": f"{type(e).__name__}: {str(e)[:300]}"}))
        return
    err = None
    if est:
        errs = [abs(est(a, b) - true_j(a, b)) for a, b in pairs[:50]]
        err = round(float(np.mean(errs)), 4)
    print(json.dumps({"lib": lib, "docs": len(docs), "MB": round(mb, 2), "shingle_s": round(t1 - t0, 2),
                      "signature_s": round(t2 - t1, 2), "signature_MB/s": round(mb / (t2 - t1), 2),
                      "total_MB/s": round(mb / (t2 - t0), 2), "mean_abs_J_error": err}))


if __name__ == "__main__":
    run(sys.argv[1])
