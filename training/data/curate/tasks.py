"""The stage's four steps, each a function of (run_dir, index) that reads its inputs from the run folder, so
a process pool and a Slurm array task call them alike. Every step skips a task that finished.

    analyze(run_dir, shard)  curate/analyze/NNNNN/: docs.jsonl (train documents after filters and PII, with
                             their verdicts), index.npz (order, content hash, MinHash signature, bytes),
                             val.jsonl and val_ngrams.npy (held-out documents), removed.jsonl (unreadable)
    dedup(run_dir)           curate/dedup/: decisions.npz (per document: kept, exact or near duplicate, and
                             the document kept instead), decontam_reference.npz
    write(run_dir, shard)    corpus/train/part-NNNNN.jsonl, corpus/val/part-NNNNN.jsonl, curate/write/NNNNN/
                             (removed.jsonl, the funnel counts, examples)
    report(run_dir)          stats.json, removed.jsonl, report.md, funnel.png (report.py)
"""

from __future__ import annotations

import json
import shutil
import time
from collections import Counter
from functools import lru_cache
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from jobspec.contract import CURATED_CORPUS
from training.data.curate import decontam
from training.data.curate.clusters import exact_duplicates, near_duplicates
from training.data.curate.exact import content_hash
from training.data.curate.filters import apply_filters
from training.data.curate.minhash import ngram_hashes, signatures, unit_hashes
from training.data.curate.pii import redact
from training.data.curate.plan import read_plan
from training.data.curate.publish import append_progress, done_record, publishing, task_dir
from training.data.curate.read import read_file

KEPT, EXACT, NEAR = 0, 1, 2  # decisions.npz status


@lru_cache(maxsize=4)
def load_config(run_dir: Path):
    return OmegaConf.load(Path(run_dir) / "config.yaml")


class Timer(dict):
    """CPU seconds of this process per named step, and the documents and bytes each step handled, summed: the
    benchmark's per-core throughput (CPU time, not wall time, so that other work on a shared machine does not
    count)."""

    def __init__(self):
        super().__init__()
        self.handled: dict[str, list[int]] = {}

    def count(self, name: str, nbytes: int) -> None:
        counts = self.handled.setdefault(name, [0, 0])
        counts[0] += 1
        counts[1] += nbytes

    def time(self, name: str, nbytes: int | None = None):
        """A context that adds its CPU time to `name`; with nbytes, also counts one document handled."""
        timer = self
        if nbytes is not None:
            self.count(name, nbytes)

        class _Span:
            def __enter__(self):
                self.start = time.process_time()

            def __exit__(self, *exc):
                timer[name] = timer.get(name, 0.0) + time.process_time() - self.start

        return _Span()

    def summary(self) -> dict:
        return {"seconds": {k: round(v, 4) for k, v in self.items()}, "handled": self.handled}


# ------------------------------------------------------------------ analyze (one per shard)


def analyze(run_dir: Path, shard: int) -> dict:
    run_dir = Path(run_dir)
    final = task_dir(run_dir, "analyze", shard)
    summary = done_record(final)
    if summary is not None:
        return dict(summary, skipped=True)
    cfg, plan = load_config(run_dir), read_plan(run_dir)
    c = cfg.curate
    summary = {
        "shard": shard,
        "docs": 0,
        "bytes": 0,
        "train_records": 0,
        "train_bytes": 0,
        "readable": 0,
        "val_docs": 0,
        "val_bytes": 0,
        "unreadable": {},
        "seconds": {},
    }
    timer, unreadable = Timer(), Counter()
    rows: dict[str, list] = {"order": [], "hash": []}
    shingles, val_grams = [], []
    final.parent.mkdir(parents=True, exist_ok=True)
    with (
        publishing(final, summary) as tmp,
        open(tmp / "docs.jsonl", "w") as docs,
        open(tmp / "val.jsonl", "w") as val,
        open(tmp / "removed.jsonl", "w") as removed,
    ):
        for file_index in plan["shards"][shard]:
            file = plan["files"][file_index]
            summary["docs"] += file["records"]
            records = read_file(file, file_index, cfg.data.text_field, cfg.data.val_fraction, c.read.normalization)
            while True:
                with timer.time("read"):
                    record = next(records, None)
                if record is None:
                    break
                summary["bytes"] += record.nbytes
                timer.count("read", record.nbytes)
                if record.split == "val":
                    summary["val_docs"] += 1
                    summary["val_bytes"] += record.nbytes
                    val.write(json.dumps({cfg.data.text_field: record.text}) + "\n")
                    if c.decontamination.enabled and c.decontamination.heldout:
                        with timer.time("decontamination", record.nbytes):
                            val_grams.append(decontam.text_ngrams(record.text, c.decontamination.ngram))
                    continue
                summary["train_records"] += 1
                summary["train_bytes"] += record.nbytes
                if record.problem:
                    unreadable[record.problem.split(":")[0]] += 1
                    removed.write(
                        json.dumps(
                            {
                                "source": record.source,
                                "index": record.index,
                                "reason": "unreadable",
                                "detail": record.problem,
                            }
                        )
                        + "\n"
                    )
                    continue
                _analyze_one(record, c, timer, rows, shingles, docs)
        with timer.time("near_dedup"):
            sigs = (
                signatures(shingles, c.near_dedup.num_perm, c.near_dedup.seed)
                if c.near_dedup.enabled
                else np.zeros((len(shingles), 0), np.uint32)
            )
        np.savez(
            tmp / "index.npz",
            order=np.array(rows["order"], np.int64),
            hash=np.array(rows["hash"], np.uint64).reshape(-1, 2),
            sig=sigs,
            has_sig=np.array([len(s) > 0 for s in shingles], bool),
        )
        grams = np.unique(np.concatenate(val_grams)) if val_grams else np.zeros(0, np.uint64)
        np.save(tmp / "val_ngrams.npy", grams, allow_pickle=False)
        summary.update(readable=len(rows["order"]), unreadable=dict(unreadable), **timer.summary())
    _progress(run_dir, plan)
    return summary


def _analyze_one(record, c, timer: Timer, rows: dict, shingles: list, docs) -> None:
    """One readable training document: its hashes and signature input, filter verdict and PII redaction."""
    text = record.text
    nbytes = len(text.encode())
    with timer.time("exact_dedup", nbytes):
        rows["hash"].extend(
            content_hash(text, c.exact_dedup.normalize_whitespace) if c.exact_dedup.enabled else (0, record.order)
        )  # disabled: unique keys
    with timer.time("near_dedup", nbytes):
        shingles.append(
            ngram_hashes(unit_hashes(text, c.near_dedup.unit), c.near_dedup.ngram)
            if c.near_dedup.enabled
            else np.zeros(0, np.uint64)
        )
    with timer.time("filters", nbytes):
        text, why = apply_filters(text, c.filters)
    filtered_nbytes = len(text.encode())
    pii: Counter = Counter()
    if c.pii.enabled and why is None:
        with timer.time("pii", filtered_nbytes):
            text, pii = redact(text, c.pii)
    rows["order"].append(record.order)
    # bytes as read (normalized) and after the filters: the funnel's byte columns; the text is the final one
    docs.write(
        json.dumps(
            {
                "order": record.order,
                "source": record.source,
                "index": record.index,
                "text": text,
                "filter": why,
                "pii": dict(pii),
                "bytes": nbytes,
                "filtered_bytes": filtered_nbytes,
            }
        )
        + "\n"
    )


def _progress(run_dir: Path, plan: dict) -> None:
    """Documents read by every finished analyze task (this one included), as a step counter."""
    done = [s for s in range(len(plan["shards"])) if done_record(task_dir(run_dir, "analyze", s)) is not None]
    read = sum(plan["files"][f]["records"] for s in done for f in plan["shards"][s])
    append_progress(
        run_dir,
        {
            "step": read,
            "max_steps": plan["docs"],
            "phase": "analyze",
            "shards_done": len(done),
            "shards": len(plan["shards"]),
        },
    )
    print(
        f"[curate] analyze: {len(done)}/{len(plan['shards'])} shards, {read:,}/{plan['docs']:,} documents read",
        flush=True,
    )


# ------------------------------------------------------------------ dedup (one, across shards)


def dedup(run_dir: Path) -> dict:
    run_dir = Path(run_dir)
    final = task_dir(run_dir, "dedup")
    summary = done_record(final)
    if summary is not None:
        return dict(summary, skipped=True)
    cfg, plan = load_config(run_dir), read_plan(run_dir)
    c = cfg.curate
    timer = Timer()
    index = [
        np.load(task_dir(run_dir, "analyze", s) / "index.npz", allow_pickle=False) for s in range(len(plan["shards"]))
    ]
    order = np.concatenate([x["order"] for x in index])
    assert np.all(order[1:] > order[:-1]), "shards must be in reading order"
    status, kept = np.full(len(order), KEPT, np.int8), np.arange(len(order))
    if c.exact_dedup.enabled:
        with timer.time("exact_dedup"):
            first = exact_duplicates(np.concatenate([x["hash"] for x in index]))
            status[first != kept], kept = EXACT, first
    if c.near_dedup.enabled:
        with timer.time("near_dedup"):
            sigs = np.concatenate([x["sig"] for x in index])
            candidates = np.flatnonzero((status == KEPT) & np.concatenate([x["has_sig"] for x in index]))
            root = candidates[near_duplicates(sigs[candidates], c.near_dedup.bands, c.near_dedup.threshold)]
            near = root != candidates
            status[candidates[near]], kept[candidates[near]] = NEAR, root[near]
    summary = {"exact_duplicates": int((status == EXACT).sum()), "near_duplicates": int((status == NEAR).sum())}
    with publishing(final, summary) as tmp:
        np.savez(tmp / "decisions.npz", order=order, status=status, kept_order=order[kept])
        with timer.time("decontamination"):
            _write_reference(run_dir, plan, c.decontamination, tmp / decontam.REFERENCE)
        summary.update(timer.summary())
    append_progress(
        run_dir,
        {
            "step": plan["docs"],
            "max_steps": plan["docs"],
            "phase": "dedup",
            "exact_duplicates": summary["exact_duplicates"],
            "near_duplicates": summary["near_duplicates"],
        },
    )
    print(
        f"[curate] dedup: {summary['exact_duplicates']:,} exact and {summary['near_duplicates']:,} near "
        "duplicates across all shards",
        flush=True,
    )
    return summary


def _write_reference(run_dir: Path, plan: dict, dc, path: Path) -> None:
    parts: dict[str, list] = {}
    if dc.enabled:
        for name, text in decontam.task_texts(dc.tasks):
            parts.setdefault(f"task:{name}", []).append(decontam.text_ngrams(text, dc.ngram))
        if dc.heldout:
            parts["heldout"] = [
                np.load(task_dir(run_dir, "analyze", s) / "val_ngrams.npy", allow_pickle=False)
                for s in range(len(plan["shards"]))
            ]
    decontam.build_reference(parts, path)


# ------------------------------------------------------------------ write (one per shard)


def write(run_dir: Path, shard: int) -> dict:
    run_dir = Path(run_dir)
    final = task_dir(run_dir, "write", shard)
    summary = done_record(final)
    if summary is not None:
        return dict(summary, skipped=True)
    cfg, plan = load_config(run_dir), read_plan(run_dir)
    c = cfg.curate
    decisions = np.load(task_dir(run_dir, "dedup") / "decisions.npz", allow_pickle=False)
    references = decontam.load_reference(task_dir(run_dir, "dedup") / decontam.REFERENCE)
    source = task_dir(run_dir, "analyze", shard)
    corpus = run_dir / CURATED_CORPUS
    summary = {
        "shard": shard,
        "funnel": {},
        "filtered": {},
        "pii_redactions": {},
        "decontaminated": {},
        "examples": {},
        "seconds": {},
    }
    timer = Timer()
    with publishing(final, summary) as tmp:
        with (
            open(source / "docs.jsonl") as docs,
            open(tmp / "removed.jsonl", "w") as removed,
            open(tmp / "part.jsonl", "w") as part,
        ):
            for line in docs:
                doc = json.loads(line)
                verdict = _verdict(doc, decisions, references, plan, c, timer, summary)
                if verdict is None:
                    part.write(json.dumps({cfg.data.text_field: doc["text"]}) + "\n")
                else:
                    removed.write(json.dumps(verdict) + "\n")
                    _example(summary["examples"], verdict, doc, c.report_examples)
        for split, src in (("train", tmp / "part.jsonl"), ("val", source / "val.jsonl")):
            (corpus / split).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, corpus / split / f".part-{shard:05d}.jsonl.tmp")
            (corpus / split / f".part-{shard:05d}.jsonl.tmp").replace(corpus / split / f"part-{shard:05d}.jsonl")
        (tmp / "part.jsonl").unlink()
        summary.update(timer.summary())
    return summary


def _verdict(doc: dict, decisions, references: dict, plan: dict, c, timer: Timer, summary: dict):
    """None to keep the document; else its removed.jsonl line. Counts the funnel on the way: documents and
    bytes left after each step."""
    funnel = summary["funnel"]
    i = int(np.searchsorted(decisions["order"], doc["order"]))
    status = int(decisions["status"][i])
    where = {"source": doc["source"], "index": doc["index"]}
    _count(funnel, "read", doc["bytes"])
    if status != EXACT:
        _count(funnel, "exact_dedup", doc["bytes"])
    if status != KEPT:
        kept = int(decisions["kept_order"][i])
        file = plan["files"][kept >> 32]
        kept_index = kept & 0xFFFFFFFF if file["path"].endswith((".jsonl", ".parquet")) else None
        return {
            **where,
            "reason": "exact_duplicate" if status == EXACT else "near_duplicate",
            "kept": {"source": file["path"], "index": kept_index},
        }
    _count(funnel, "near_dedup", doc["bytes"])
    if doc["filter"]:
        name, _, why = doc["filter"].partition(": ")
        summary["filtered"][name] = summary["filtered"].get(name, 0) + 1
        return {**where, "reason": "filtered", "filter": name, "detail": why}
    _count(funnel, "filters", doc["filtered_bytes"])
    for kind, n in doc["pii"].items():
        summary["pii_redactions"][kind] = summary["pii_redactions"].get(kind, 0) + n
    final_bytes = len(doc["text"].encode())
    _count(funnel, "pii", final_bytes)
    if c.decontamination.enabled:
        with timer.time("decontamination", len(doc["text"].encode())):
            matched = decontam.match(doc["text"], references, c.decontamination.ngram)
        if matched:
            summary["decontaminated"][matched] = summary["decontaminated"].get(matched, 0) + 1
            return {**where, "reason": "decontaminated", "reference": matched}
    _count(funnel, "decontamination", final_bytes)
    return None


def _count(funnel: dict, step: str, nbytes: int) -> None:
    docs, total = funnel.get(step, (0, 0))
    funnel[step] = (docs + 1, total + nbytes)


def _example(examples: dict, verdict: dict, doc: dict, limit: int) -> None:
    key = verdict.get("filter") or verdict["reason"]
    shown = examples.setdefault(key, [])
    if len(shown) < limit:
        shown.append({**verdict, "excerpt": doc["text"][:400]})


# ------------------------------------------------------------------ report (one)


def report(run_dir: Path) -> dict:
    """stats.json, removed.jsonl, report.md and funnel.png from every task's summary; stats.json comes last,
    so its presence means the stage is complete."""
    from training.data.curate.report import STATS, write_report

    run_dir = Path(run_dir)
    if (run_dir / STATS).is_file():
        return dict(json.loads((run_dir / STATS).read_text()), skipped=True)
    cfg, plan = load_config(run_dir), read_plan(run_dir)
    shards = range(len(plan["shards"]))
    analyzed = [done_record(task_dir(run_dir, "analyze", s)) for s in shards]
    written = [done_record(task_dir(run_dir, "write", s)) for s in shards]
    deduped = done_record(task_dir(run_dir, "dedup"))
    tmp = run_dir / ".removed.jsonl.tmp"
    with open(tmp, "wb") as out:
        for s in shards:
            for step in ("analyze", "write"):
                with open(task_dir(run_dir, step, s) / "removed.jsonl", "rb") as f:
                    shutil.copyfileobj(f, out)
    tmp.replace(run_dir / "removed.jsonl")
    stats = write_report(run_dir, cfg, plan, analyzed, deduped, written)
    append_progress(
        run_dir,
        {
            "step": plan["docs"],
            "max_steps": plan["docs"],
            "phase": "report",
            "output_docs": stats["output_docs"],
            "bytes_out": stats["bytes_out"],
        },
    )
    return stats
