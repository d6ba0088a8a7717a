"""The stage's inputs, fixed once in the run folder's curate/plan.json.

Every input file gets an index in reading order (sources in the order given, folders walked sorted), and
every document a global order = file index << 32 | record index. Duplicates keep the document that comes
first in that order, whatever the shards: the result does not depend on how many tasks or workers ran.

Shards are runs of consecutive files of about equal size. A file is never split, so one huge .jsonl is
one task: split such files beforehand to spread them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from jobspec import atomic
from training.data import DataError
from training.data.corpus import demo_files, source_files

PLAN = "plan.json"
SHARD_BYTES = 64 << 20  # at least one shard per 64 MiB of input
SHARDS_PER_WORKER = 4  # several per worker, so that a slow shard doesn't leave the others idle


def curate_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "curate"


def config_fingerprint(cfg) -> str:
    """What decides the outputs: the sources and every curate setting. A rerun with others starts over."""
    from omegaconf import OmegaConf

    keyed = {
        "sources": list(cfg.data.sources),
        "text_field": cfg.data.text_field,
        "val_fraction": cfg.data.val_fraction,
        "max_docs": cfg.data.max_docs,
        "curate": OmegaConf.to_container(cfg.curate, resolve=True),
    }
    keyed["curate"].pop("workers", None)  # how many processes run doesn't change the result
    return hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:16]


def input_files(cfg) -> list[dict]:
    """[{path, name, split, records, bytes}] in reading order; split is train, val or hash (per record)."""
    files = []
    for src in cfg.data.sources:
        if src == "demo":
            for split in ("train", "val"):
                files += [_file(p, p.name, split) for p in demo_files(split)]
            continue
        for path, name in source_files(src, tuple(cfg.curate.read.suffixes)):
            files.append(_file(path, name, "hash"))
    return files


def _file(path: Path, name: str, split: str) -> dict:
    return {
        "path": str(path),
        "name": name,
        "split": split,
        "records": count_records(path),
        "bytes": path.stat().st_size,
    }


def count_records(path: Path) -> int:
    """Documents in one file, for the progress counter: non-blank lines of .jsonl, rows of .parquet, else 1."""
    if path.suffix == ".jsonl":
        with open(path, "rb") as f:
            return sum(1 for line in f if line.strip())
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq

            return pq.ParquetFile(path).metadata.num_rows
        except Exception:  # unreadable: counted as one bad file when read
            return 1
    return 1


def split_shards(files: list[dict], shards: int, workers: int) -> list[list[int]]:
    """Consecutive runs of file indices, about equal in bytes."""
    total = sum(f["bytes"] for f in files)
    n = shards or max(SHARDS_PER_WORKER * workers, -(-total // SHARD_BYTES))
    n = max(1, min(n, len(files)))
    bounds, acc, out, current = [total * (k + 1) / n for k in range(n)], 0, [], []
    for i, f in enumerate(files):
        current.append(i)
        acc += f["bytes"]
        if acc >= bounds[len(out)] and len(out) < n - 1 and len(files) - i - 1 >= n - len(out) - 1:
            out.append(current)
            current = []
    out.append(current)
    return [s for s in out if s]


def make_plan(cfg, run_dir: Path, workers: int) -> dict:
    """plan.json, written once: a restart reads it back (and refuses a changed config)."""
    path = curate_dir(run_dir) / PLAN
    fingerprint = config_fingerprint(cfg)
    if path.is_file():
        plan = json.loads(path.read_text())
        if plan["fingerprint"] != fingerprint:
            raise DataError(
                f"{run_dir}: this run folder holds a curation made with other settings (fingerprint "
                f"{plan['fingerprint']}, now {fingerprint}); submit it as a new run instead"
            )
        return plan
    files = input_files(cfg)
    if cfg.data.max_docs is not None:
        files = _cap(files, cfg.data.max_docs)
    if not files:
        raise DataError(f"key 'data.sources' has the value {list(cfg.data.sources)!r}, but it holds no documents")
    plan = {
        "fingerprint": fingerprint,
        "files": files,
        "shards": split_shards(files, cfg.curate.shards, workers),
        "docs": sum(f["records"] for f in files),
        "bytes": sum(f["bytes"] for f in files),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_json(path, plan)
    return plan


def _cap(files: list[dict], max_docs: int) -> list[dict]:
    """A quick run: the first files holding max_docs documents of each split (as pretraining caps its splits);
    the last file's records are capped."""
    out, seen = [], {}
    for f in files:
        taken = seen.get(f["split"], 0)
        if taken >= max_docs:
            continue
        f = dict(f, records=min(f["records"], max_docs - taken))
        out.append(f)
        seen[f["split"]] = taken + f["records"]
    return out


def read_plan(run_dir: Path) -> dict:
    return json.loads((curate_dir(run_dir) / PLAN).read_text())
