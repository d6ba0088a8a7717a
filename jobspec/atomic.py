"""Files written whole or not at all: a temporary name beside the target, then a rename, so a reader (or a run
resumed after a crash) sees the old file or the new one, never half of one. `durable` also flushes the file and its
folder to disk before returning, for what must survive a power loss (checkpoint metadata, configs)."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from jobspec.faults import fault


def write_bytes(path, data: bytes, *, durable: bool = False) -> None:
    path = Path(path)
    # pid and thread: two writers of one file (a trainer and its async saver, two ranks) never share a temporary
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        fault("atomic.written")
        os.replace(tmp, path)
        fault("atomic.replaced")
    finally:
        tmp.unlink(missing_ok=True)  # only left when the write or the rename failed
    if durable:
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)  # the rename itself
        finally:
            os.close(fd)


def write_text(path, text: str, *, durable: bool = False) -> None:
    write_bytes(path, text.encode("utf-8"), durable=durable)


def write_json(path, value, *, durable: bool = False) -> None:
    write_text(path, json.dumps(value, indent=1) + "\n", durable=durable)
