"""Reading one planned file's documents, never failing on bad data.

A training document that can't be used becomes a Record with a `problem` (binary, not_utf8, empty,
bad_record, unreadable_file) that the stage counts and lists in removed.jsonl. Held-out documents are read
exactly as pretraining reads them (training/data/corpus.py: bytes decoded with replacement characters, empty
ones skipped) and pass through untouched, so a model trained on the cleaned corpus is measured on the same
bytes as one trained on the raw corpus.
"""

from __future__ import annotations

import json
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from training.data.corpus import is_val

FORMS = ("NFC", "NFKC", "NFD", "NFKD", "none")


@dataclass
class Record:
    order: int  # file index << 32 | record index: the global reading order
    source: str  # the file's path
    index: Optional[int]  # the record's line (.jsonl) or row (.parquet); None for a text file
    split: str  # train or val
    nbytes: int  # UTF-8 bytes of the text as read
    text: Optional[str] = None
    problem: Optional[str] = None  # why it can't be used; text is None then


def normalize(text: str, form: str) -> str:
    return text if form == "none" else unicodedata.normalize(form, text)


def read_file(file: dict, file_index: int, field: str, val_fraction: float, form: str) -> Iterator[Record]:
    """Records of one plan entry, at most file["records"] of them, in order."""
    path = Path(file["path"])
    if path.suffix == ".jsonl":
        records = _jsonl(path, field)
    elif path.suffix == ".parquet":
        records = _parquet(path, field)
    else:
        records = _text(path)
    for n, (index, raw, problem) in enumerate(records):
        if n >= file["records"]:
            return
        split = file["split"]
        if split == "hash":
            split = "val" if is_val(file["name"], index or 0, val_fraction) else "train"
        record = Record(
            order=(file_index << 32) | (index or 0),
            source=str(path),
            index=index,
            split=split,
            nbytes=len(raw) if isinstance(raw, bytes) else len(raw.encode()),
        )
        if split == "val":  # as pretraining reads it
            record.text = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw
            if record.text:
                yield record
            continue
        record.problem = problem or _problem(raw)
        if record.problem is None:
            text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
            record.text = normalize(text, form)
        yield record


def _problem(raw) -> Optional[str]:
    if isinstance(raw, bytes):
        if b"\x00" in raw:
            return "binary"
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            return "not_utf8"
    else:
        text = raw
    return None if text.strip() else "empty"


def _text(path: Path) -> Iterator[tuple[Optional[int], bytes, Optional[str]]]:
    try:
        yield None, path.read_bytes(), None
    except OSError as e:
        yield None, b"", f"unreadable_file: {e.strerror or e}"


def _jsonl(path: Path, field: str) -> Iterator[tuple[int, object, Optional[str]]]:
    """(line number, text or raw line, problem) per non-blank line; the line number feeds the val hash."""
    try:
        f = open(path, "rb")
    except OSError as e:
        yield 0, b"", f"unreadable_file: {e.strerror or e}"
        return
    with f:
        for line_no, line in enumerate(f):
            if not line.strip():
                continue
            try:
                text = json.loads(line.decode("utf-8"))[field]
            except UnicodeDecodeError:
                yield line_no, line, "not_utf8"
                continue
            except (json.JSONDecodeError, KeyError, TypeError):
                yield line_no, line, f"bad_record: not a JSON object with a field {field!r}"
                continue
            if not isinstance(text, str):
                yield line_no, line, f"bad_record: field {field!r} is a {type(text).__name__}"
                continue
            yield line_no, text, None


def _parquet(path: Path, field: str) -> Iterator[tuple[int, object, Optional[str]]]:
    try:
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        if field not in pf.schema_arrow.names:
            raise ValueError(f"no column {field!r}; its columns are {pf.schema_arrow.names}")
        batches = pf.iter_batches(batch_size=1024, columns=[field])
        index = 0
        for batch in batches:
            for text in batch.column(0).to_pylist():
                if text is None:
                    yield index, "", "empty"
                elif not isinstance(text, str):
                    yield index, "", f"bad_record: column {field!r} holds {type(text).__name__}"
                else:
                    yield index, text, None
                index += 1
    except Exception as e:  # pyarrow raises many kinds for a damaged file
        yield 0, b"", f"unreadable_file: {type(e).__name__}: {e}"
