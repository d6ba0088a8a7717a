"""Checks of a data job's `curate:` section (kind: data), called by jobspec/checks.py's check_values.
`bad(key, why, *also)` builds the SpecError naming where the value came from (the command line, if it set key
or one of the keys in also), the key and the value."""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig

REPO = Path(__file__).resolve().parents[1]
NORMALIZATIONS = ("NFC", "NFKC", "NFD", "NFKD", "none")


def check_curate(cfg: DictConfig, bad) -> None:
    """The data job's settings (unknown filter names are unknown keys, refused before this; each number was
    checked against its range in jobspec/curate_schema.py)."""
    c = cfg.curate
    if c.read.normalization not in NORMALIZATIONS:
        raise bad("curate.read.normalization", f"but it must be one of {', '.join(NORMALIZATIONS)}")
    for i, suffix in enumerate(c.read.suffixes):
        if not suffix.startswith(".") or len(suffix) < 2:
            raise bad(f"curate.read.suffixes[{i}]", "but a suffix starts with a dot, e.g. .py")
    near = c.near_dedup
    if near.unit not in ("word", "token"):
        raise bad("curate.near_dedup.unit", "but it must be word or token")
    if near.num_perm % near.bands:  # each at least 1: their ranges are checked before
        raise bad(
            "curate.near_dedup.bands",
            f"but it must divide curate.near_dedup.num_perm={near.num_perm} "
            "(each band takes num_perm / bands rows of the signature)",
            "curate.near_dedup.num_perm",
        )
    for i, task in enumerate(c.decontamination.tasks if c.decontamination.enabled else []):
        if not (os.path.isfile(task) or (REPO / task).is_file()):
            raise bad(
                f"curate.decontamination.tasks[{i}]",
                "but no such task file exists (in the current "
                "folder or the repository; e.g. jobs/tasks/stdlib_continuation.yaml)",
            )
