"""Classification examples: JSON lines of {"text": ..., "label": ...} (labels are strings), and the demo task.

The demo task, derived offline from this machine's standard library: is a function's body in the order it
was written? Each short documented function appears twice: as written ("original") and with the lines of its
body after the docstring in a random order ("shuffled"). Training functions come from the demo corpus'
training modules, held-out ones from its held-out packages (json, email): the two splits share no module.
Both classes hold the same words, so a bag of words sees little (only the word pairs across a line break
change); a model that has learned how code reads sees a jumbled body at once.
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
DEMO_LABELS = ("original", "shuffled")
FORMAT_VERSION = 2


def read_examples(path, what: str) -> list[dict]:
    """The file's records, each with string "text" and "label" (a DataError names the file and line)."""
    return read_jsonl(path, KEYS, what=what)


def label_set(train: list[dict], val: list[dict], train_path, val_path) -> list[str]:
    """The sorted labels of the training file; a DataError when it has one class, or when the held-out
    file has labels the training file lacks (the head would have no logit for them)."""
    labels = sorted({r["label"] for r in train})
    if len(labels) < 2:
        raise DataError(
            f"{train_path} (classify.train_file) has a single label {labels[0]!r}: classification "
            "needs at least two classes"
        )
    unknown = sorted({r["label"] for r in val} - set(labels))
    if unknown:
        raise DataError(f"{val_path} (classify.val_file) has labels the training file lacks: {unknown[:5]}")
    return labels


def _shuffle_body(source: str, rng: random.Random) -> Optional[str]:
    """source (a dedented function) with the lines after its docstring in another order; None when it has
    fewer than three such lines (too few orders to tell apart)."""
    try:
        body = ast.parse(source).body[0].body
    except (SyntaxError, IndexError):
        return None
    if len(body) < 2:
        return None
    lines = source.rstrip("\n").split("\n")
    head, rest = lines[: body[1].lineno - 1], lines[body[1].lineno - 1 :]
    if sum(1 for line in rest if line.strip()) < 3 or len(set(rest)) < 2:
        return None
    shuffled = rest[:]
    while shuffled == rest:
        rng.shuffle(shuffled)
    return "\n".join(head + shuffled)


def write_demo(
    out_dir, tokenizer_path, max_tokens: int, seed: int = 0, max_docs: Optional[int] = None
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
    if (
        meta.is_file()
        and all(p.is_file() for p in paths)
        and json.loads(meta.read_text()).get("fingerprint") == fingerprint
    ):
        return paths
    counts = {}
    tokenizer = load_tokenizer(tokenizer_path)
    for split, path in zip(("train", "val"), paths):
        functions = _unique(_functions(demo_files(split)[:max_docs]))
        # whole functions only, with room for the closing <|endoftext|>
        lengths = [
            len(e.ids) for e in tokenizer.encode_batch([f["source"] for f in functions], add_special_tokens=False)
        ]
        functions = [f for f, n in zip(functions, lengths) if n < max_tokens]
        rng = random.Random(f"{seed}-{split}")
        records = []
        for f in functions:
            shuffled = _shuffle_body(f["source"], rng)
            if shuffled is None:
                continue
            records += [
                {"text": f["source"].rstrip("\n"), "label": "original"},
                {"text": shuffled, "label": "shuffled"},
            ]
        rng.shuffle(records)
        counts[split] = write_jsonl(path, records)
    write_jsonl(meta, [{"fingerprint": fingerprint, "counts": counts}])
    return paths
