"""Decontamination: a training document that shares a long word n-gram (13 by default, as GPT-3 and the
Llama papers did) with an eval task's data or with the held-out split is removed, so that evaluation and
held-out bits per byte measure generalisation, not recall.

The reference is a sorted array of 64-bit n-gram hashes (a set of a few million hashes takes tens of MB); a
document is contaminated when any of its n-gram hashes is in it. Words are runs of letters, digits and '_',
lowercased: the same n-gram in other spacing or case still matches.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from training.data.curate.minhash import ngram_hashes, unit_hashes

REFERENCE = "decontam_reference.npz"  # one sorted uint64 array per reference: "heldout", "task:NAME"


def text_ngrams(text: str, n: int) -> np.ndarray:
    """Unique hashes of the text's word n-grams; none for a text shorter than n words."""
    units = unit_hashes(text, "word")
    return ngram_hashes(units, n) if len(units) >= n else np.zeros(0, np.uint64)


def task_texts(task_files: Iterable[str]) -> Iterator[tuple[str, str]]:
    """(task name, text) for every string in every record of each eval task's data."""
    from training.evaluate.tasks import load_task

    for path in task_files:
        task = load_task(path)
        for doc in task.docs:
            for text in _strings(doc):
                yield task.name, text


def _strings(value) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def build_reference(parts: dict[str, list[np.ndarray]], path: Path) -> dict[str, np.ndarray]:
    references = {
        name: np.unique(np.concatenate(arrays)) if arrays else np.zeros(0, np.uint64) for name, arrays in parts.items()
    }
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **references)
    tmp.replace(path)
    return references


def load_reference(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as f:
        return {name: f[name] for name in f.files}


def match(text: str, references: dict[str, np.ndarray], n: int) -> str | None:
    """The name of the first reference sharing an n-gram with the text, or None."""
    grams = text_ngrams(text, n)
    if len(grams) == 0:
        return None
    for name, reference in references.items():
        if len(reference):
            pos = np.searchsorted(reference, grams)
            pos[pos == len(reference)] = 0
            if np.any(reference[pos] == grams):
                return name
    return None
