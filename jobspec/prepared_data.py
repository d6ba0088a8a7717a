"""Where a job's tokenized data lives: `data.dir`, or by default a folder named by the data config's fingerprint.

The fingerprint covers the keys that decide the bytes on disk, so runs with the same data config share one
prepared folder (training/data/prepare.py writes it once; a second run finds its meta.json and keeps it), and a
user's own sources get a folder of their own without naming one:

    data.dir: null   sources [demo] with the demo's settings -> data/demo
                     anything else                           -> data/prepared/<fingerprint>

A folder that holds data made from another config, or something that is not prepared data, is refused at submit.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

FORMAT_VERSION = 1  # bump when packing or layout (training/data/prepare.py) changes: older folders then read as another
# The config keys that decide the bytes on disk; dir, remote, num_workers and shuffle don't.
FINGERPRINT_KEYS = ("sources", "text_field", "tokenizer", "vocab_size", "seq_len", "val_fraction", "max_docs")
DEMO_DIR = "data/demo"
DATA_ROOT = "data/prepared"
META = "meta.json"


def config_dict(cfg) -> dict:
    """A DataConfig (dataclass or OmegaConf node) as plain JSON-able values."""
    from jobspec.schema import DataConfig

    out = {}
    for f in dataclasses.fields(DataConfig):
        value = getattr(cfg, f.name)
        out[f.name] = list(value) if f.name == "sources" else value
    return out


def fingerprint(cfg) -> str:
    keyed = {k: config_dict(cfg)[k] for k in FINGERPRINT_KEYS}
    keyed["format"] = FORMAT_VERSION
    return hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:16]


def default_dir(data) -> str:
    """data.dir for a data section that names none."""
    from jobspec.schema import DataConfig

    mine = fingerprint(data)
    return DEMO_DIR if mine == fingerprint(DataConfig()) else f"{DATA_ROOT}/{mine}"


def check_prepared(cfg, bad) -> None:
    """A pretrain job's data.dir must be empty, absent, or prepared from this very data config: otherwise the
    trainer would refuse it on the node, after queueing (a data.remote job's data.dir is only a cache)."""
    data = cfg.data
    if cfg.kind != "pretrain" or data.remote:
        return
    folder = Path(data.dir)
    meta = folder / META
    if meta.is_file():
        try:
            theirs = json.loads(meta.read_text())
        except (OSError, ValueError):
            theirs = {}
        if theirs.get("fingerprint") != fingerprint(data):
            made_from = {k: theirs.get("config", {}).get(k) for k in FINGERPRINT_KEYS}
            raise bad(
                "data.dir",
                f"but that folder holds data made from another data config ({json.dumps(made_from)}). Leave "
                f"data.dir out (data/prepared/<fingerprint> is made for this config), pick another folder, or "
                "delete that one to prepare it again",
                *(f"data.{k}" for k in FINGERPRINT_KEYS),
            )
    elif folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise bad(
            "data.dir",
            f"but that path exists and is not prepared data (no {META}). Leave data.dir out, pick another "
            "folder, or delete that one",
        )
