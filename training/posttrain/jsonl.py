"""JSON-lines files of post-training records: read with errors that say where, write atomically."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

from jobspec import atomic
from training.data import DataError


def read_jsonl(
    path, required: Sequence[str] = (), *, what: str = "", check: Optional[Callable[[dict], None]] = None
) -> list[dict]:
    """Every record of a .jsonl file (blank lines skipped), each checked to hold the `required`
    keys with string values, and to pass `check` (which raises DataError or ValueError). A problem
    raises a DataError naming the file, the line and the key; `what` names the config key the
    file came from (e.g. "sft.train_file") for the message."""
    path = Path(path)
    where = f" ({what})" if what else ""
    if not path.is_file():
        raise DataError(
            f"no such file {str(path)!r}{where}: expected a .jsonl file with one JSON object "
            f"per line holding the keys {list(required)}"
        )
    records = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{line_no}{where}: not valid JSON ({e.msg}): {line[:80]!r}") from None
            if not isinstance(record, dict):
                raise DataError(
                    f"{path}:{line_no}{where}: expected a JSON object, got a {type(record).__name__}: {line[:80]!r}"
                )
            for key in required:
                if key not in record:
                    raise DataError(
                        f"{path}:{line_no}{where}: the record has no key {key!r} (it has "
                        f"{sorted(record)}); every line needs {list(required)}"
                    )
                if not isinstance(record[key], str):
                    raise DataError(
                        f"{path}:{line_no}{where}: key {key!r} holds a {type(record[key]).__name__}, expected a string"
                    )
            if check is not None:
                try:
                    check(record)
                except (DataError, ValueError) as e:
                    raise DataError(f"{path}:{line_no}{where}: {e}") from None
            records.append(record)
    if not records:
        raise DataError(f"{path}{where} holds no records")
    return records


def write_jsonl(path, records: Iterable[dict]) -> int:
    """Write records one per line, atomically; returns the count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(record, ensure_ascii=False) + "\n" for record in records]
    atomic.write_text(path, "".join(lines))
    return len(lines)
