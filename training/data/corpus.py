"""Where text comes from: the built-in demo corpus or the user's .txt / .jsonl / .parquet files.

One document is one string. Documents come in a fixed order (sources in the order given,
folders walked in sorted order) so that preparing the same config twice gives the same shards.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import sysconfig
from pathlib import Path
from typing import Iterator

from training.data import DataError

SPLITS = ("train", "val")
SUFFIXES = (".txt", ".jsonl", ".parquet")

# The demo corpus is this machine's Python standard library. Test suites are left out (large and
# repetitive), as are IDLE and installed third-party packages. Two whole packages are held out as
# the validation split, so validation measures generalisation to unseen modules, not memorisation.
DEMO_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib"}
DEMO_VAL_PACKAGES = ("json", "email")


def iter_documents(cfg, split: str) -> Iterator[str]:
    """Every non-empty document of `split` ("train" or "val"), capped at cfg.max_docs."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    docs = (doc for src in cfg.sources for doc in _source_documents(cfg, src, split) if doc)
    return itertools.islice(docs, cfg.max_docs)  # max_docs=None: no cap


def demo_files(split: str) -> list[Path]:
    """The demo corpus' files of one split, in sorted order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if DEMO_SKIP_DIRS.intersection(parts[:-1]):
            continue
        if (parts[0] in DEMO_VAL_PACKAGES) == (split == "val"):
            files.append(path)
    return files


def source_files(src: str, suffixes: tuple[str, ...] = SUFFIXES) -> list[tuple[Path, str]]:
    """The files of one user source as (path, name), name being stable wherever the data lives."""
    kinds = ", ".join(suffixes[:-1]) + f" or {suffixes[-1]}" if len(suffixes) > 1 else suffixes[0]
    expected = f"expected 'demo', or a {kinds} file, or a folder of them"
    if "://" in src:
        raise DataError(
            f"key 'data.sources' has the value {src!r}, but remote sources are not read "
            f"directly: download them first ({expected})"
        )
    path = Path(src)
    if path.is_file():
        if path.suffix not in suffixes:
            raise DataError(
                f"key 'data.sources' has the value {src!r}, but that is a "
                f"{path.suffix or 'extension-less'} file ({expected})"
            )
        return [(path, path.name)]
    if path.is_dir():
        # Files of other types (README.md, .DS_Store, ...) in a folder are skipped, not errors.
        files = [
            (f, f.relative_to(path).as_posix())
            for f in sorted(path.rglob("*"))
            if f.is_file() and f.suffix in suffixes and not any(p.startswith(".") for p in f.relative_to(path).parts)
        ]
        if not files:
            raise DataError(
                f"key 'data.sources' has the value {src!r}, but that folder holds no {kinds} files ({expected})"
            )
        return files
    raise DataError(f"key 'data.sources' has the value {src!r}, but no such file or folder exists ({expected})")


def is_presplit(src: str) -> bool:
    """A folder with train/ and val/ subfolders (what a data job writes) is read as already split."""
    return src != "demo" and (Path(src) / "train").is_dir() and (Path(src) / "val").is_dir()


def is_val(name: str, index: int, val_fraction: float) -> bool:
    """Deterministic hold-out: a hash of (file name, record index), independent of reading order."""
    digest = hashlib.blake2b(f"{name}\0{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") < val_fraction * 2**64


def _source_documents(cfg, src: str, split: str) -> Iterator[str]:
    if src == "demo":
        for path in demo_files(split):
            yield _read_text(path)
        return
    if is_presplit(src):
        for path, _ in source_files(str(Path(src) / split)):
            for _, text in _read_records(path, cfg.text_field):
                yield text
        return
    for path, name in source_files(src):
        for index, text in _read_records(path, cfg.text_field):
            if is_val(name, index, cfg.val_fraction) == (split == "val"):
                yield text


def _read_text(path: Path) -> str:
    # Bytes, not read_text(): text mode would turn "\r\n" into "\n" and the data would lie.
    return path.read_bytes().decode("utf-8", errors="replace")


def _read_records(path: Path, field: str) -> Iterator[tuple[int, str]]:
    """(index, text) of each document in one file; the index feeds the train/val hash."""
    if path.suffix not in (".jsonl", ".parquet"):  # a text file (.txt; .py and others in a data job's corpus)
        yield 0, _read_text(path)
    elif path.suffix == ".jsonl":
        with open(path, encoding="utf-8", errors="replace") as f:
            for line_no, line in enumerate(f):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    text = record[field]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise DataError(
                        f"{path}:{line_no + 1}: expected a JSON object with a string field "
                        f"{field!r} (data.text_field), got {line[:80]!r} ({e})"
                    ) from None
                if not isinstance(text, str):
                    raise DataError(
                        f"{path}:{line_no + 1}: field {field!r} (data.text_field) is a "
                        f"{type(text).__name__}, expected a string"
                    )
                yield line_no, text
    else:  # .parquet, read in batches so a large file never sits in memory whole
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        if field not in pf.schema_arrow.names:
            raise DataError(f"{path}: no column {field!r} (data.text_field); its columns are {pf.schema_arrow.names}")
        kind = pf.schema_arrow.field(field).type
        if kind not in ("string", "large_string"):
            raise DataError(f"{path}: column {field!r} (data.text_field) holds {kind}, expected strings")
        index = 0
        for batch in pf.iter_batches(batch_size=1024, columns=[field]):
            for text in batch.column(0).to_pylist():
                if text is not None:
                    yield index, text
                index += 1
