"""Classification examples: JSON lines of {"text": ..., "label": ...} (labels are strings), and the demo task.

The demo task, derived offline from this machine's standard library: does a function's docstring belong
to it? Each short documented function appears twice: as written ("match") and with the docstring of
another function of the same split put in its place ("swapped"). Training functions come from the demo
corpus' training modules, held-out ones from its held-out packages (json, email): the two splits share
no module. A bag of words can't tell the classes apart (both hold the same docstrings and bodies); a
model has to relate the docstring to the code under it.
"""

from __future__ import annotations

import ast
import json
import random
from pathlib import Path
from typing import Optional

from training.data import DataError
from training.posttrain.jsonl import read_jsonl, write_jsonl

KEYS = ("text", "label")
DEMO_LABELS = ("match", "swapped")
FORMAT_VERSION = 1


def read_examples(path, what: str) -> list[dict]:
    """The file's records, each with string "text" and "label" (a DataError names the file and line)."""
    return read_jsonl(path, KEYS, what=what)


def label_set(train: list[dict], val: list[dict], train_path, val_path) -> list[str]:
    """The sorted labels of the training file; a DataError when it has one class, or when the held-out
    file has labels the training file lacks (the head would have no logit for them)."""
    labels = sorted({r["label"] for r in train})
    if len(labels) < 2:
        raise DataError(f"{train_path} (classify.train_file) has a single label {labels[0]!r}: classification "
                        "needs at least two classes")
    unknown = sorted({r["label"] for r in val} - set(labels))
    if unknown:
        raise DataError(f"{val_path} (classify.val_file) has labels the training file lacks: {unknown[:5]}")
    return labels


def _swap_docstring(source: str, docstring_from: str) -> Optional[str]:
    """source with its docstring's lines replaced by those of docstring_from (both dedented functions)."""
    def doc_lines(text):
        node = ast.parse(text).body[0]
        first = node.body[0]
        return first.lineno - 1, first.end_lineno

    try:
        a0, a1 = doc_lines(source)
        b0, b1 = doc_lines(docstring_from)
    except (SyntaxError, ValueError, IndexError):
        return None
    lines, other = source.split("\n"), docstring_from.split("\n")
    swapped = "\n".join(lines[:a0] + other[b0:b1] + lines[a1:])
    return swapped if swapped != source else None


def write_demo(out_dir, tokenizer_path, max_tokens: int, seed: int = 0, max_docs: Optional[int] = None
               ) -> tuple[Path, Path]:
    """classify_{train,val}.jsonl in out_dir (kept when meta.json says they were made so); functions whose
    text is longer than max_tokens tokens are left out."""
    from training.data.corpus import demo_files
    from training.data.tokenizer import load_tokenizer
    from training.posttrain.demo_data import _fingerprint, _functions, _unique

    out = Path(out_dir)
    paths = out / "classify_train.jsonl", out / "classify_val.jsonl"
    fingerprint = f"{FORMAT_VERSION}-{_fingerprint(tokenizer_path, max_docs, seed, max_tokens)}"
    meta = out / "meta.json"
    if meta.is_file() and all(p.is_file() for p in paths) and json.loads(meta.read_text()).get("fingerprint") == fingerprint:
        return paths
    counts = {}
    tokenizer = load_tokenizer(tokenizer_path)
    for split, path in zip(("train", "val"), paths):
        functions = _unique(_functions(demo_files(split)[:max_docs]))
        # whole functions only, with room for a longer swapped-in docstring and the closing <|endoftext|>
        lengths = [len(e.ids) for e in tokenizer.encode_batch([f["source"] for f in functions], add_special_tokens=False)]
        functions = [f for f, n in zip(functions, lengths) if n <= max_tokens * 3 // 4]
        rng = random.Random(f"{seed}-{split}")
        records = []
        for i, f in enumerate(functions):
            other = functions[(i + 1 + rng.randrange(len(functions) - 1)) % len(functions)]
            swapped = _swap_docstring(f["source"], other["source"])
            if swapped is None:
                continue
            records += [{"text": f["source"], "label": "match"}, {"text": swapped, "label": "swapped"}]
        rng.shuffle(records)
        counts[split] = write_jsonl(path, records)
    write_jsonl(meta, [{"fingerprint": fingerprint, "counts": counts}])
    return paths
