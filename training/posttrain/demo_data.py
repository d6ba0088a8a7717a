"""Offline post-training data derived from the demo corpus (this machine's Python standard library).

Each short documented function becomes one instruction: "write the function with this signature
and docstring", answered by its real source. From those, three kinds of records:

    sft_{train,val}.jsonl    {"prompt", "completion"}                 supervised fine-tuning
    pref_{train,val}.jsonl   {"prompt", "chosen", "rejected", "corruption"}   reward model / DPO
    grpo_{train,val}.jsonl   {"prompt", "signature", "reference"}     GRPO (reward: parses, resembles the reference)

The split is the pretraining demo's (training/data/corpus.py): functions of the held-out packages
(json, email) only ever appear in the val files, so evaluation is on code no stage trained on.

A rejected answer is the real function corrupted in one of three ways, recorded in "corruption":
  unindent  the code lines after the docstring lose their indentation (invalid Python: always
            detectable, at the very first token of the body)
  shuffle   the code lines after the docstring in another order
  rename    the def line names another function than the prompt asks for
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import json
import random
import textwrap
import warnings
from pathlib import Path
from typing import Iterator, Optional

from training.data import DataError
from training.data.corpus import DEMO_VAL_PACKAGES, demo_files
from training.posttrain.jsonl import write_jsonl

FORMAT_VERSION = 2  # bump when the records change: older folders are then derived again
NAMES = ("sft_train", "sft_val", "pref_train", "pref_val", "grpo_train", "grpo_val")
MAX_LINES = 30  # longest function kept, docstring included: fits a small model's context
MAX_CHARS = 1200
CORRUPTIONS = (("unindent", 0.5), ("shuffle", 0.25), ("rename", 0.25))


def write_demo_data(
    out_dir, tokenizer_path=None, max_docs: Optional[int] = None, seed: int = 0, max_tokens: Optional[int] = None
) -> dict[str, Path]:
    """Derive the six .jsonl files into out_dir (kept as they are if meta.json says they were made
    with these arguments); returns {"sft_train": path, ...}.

    max_docs caps the source files read per split (quick tests). With tokenizer_path and
    max_tokens, functions whose chat-formatted SFT example is longer than max_tokens tokens are
    left out, so that a small seq_len still sees whole examples."""
    out = Path(out_dir)
    paths = {name: out / f"{name}.jsonl" for name in NAMES}
    fp = _fingerprint(tokenizer_path, max_docs, seed, max_tokens)
    meta_path = out / "meta.json"
    if meta_path.is_file() and all(p.is_file() for p in paths.values()):
        if json.loads(meta_path.read_text()).get("fingerprint") == fp:
            return paths
    functions = {split: list(_functions(demo_files(split)[:max_docs])) for split in ("train", "val")}
    # The stdlib repeats some small functions; a val function must never be trained on.
    val_sources = {f["source"] for f in functions["val"]}
    functions["train"] = _unique(f for f in functions["train"] if f["source"] not in val_sources)
    functions["val"] = _unique(functions["val"])
    if tokenizer_path and max_tokens:
        functions = {split: _fitting(fs, tokenizer_path, max_tokens) for split, fs in functions.items()}
        for split, fs in functions.items():
            if not fs:
                raise DataError(
                    f"no demo function of the {split} split fits data.seq_len={max_tokens} tokens "
                    "as a chat example (prompt + answer); raise data.seq_len (256 fits about 3,500) "
                    "or give your own files"
                )
    counts = {}
    for split, fs in functions.items():
        rng = random.Random(f"{seed}-{split}")
        names = [f["name"] for f in fs]
        counts[f"sft_{split}"] = write_jsonl(
            paths[f"sft_{split}"], ({"prompt": f["prompt"], "completion": f["source"]} for f in fs)
        )
        counts[f"pref_{split}"] = write_jsonl(
            paths[f"pref_{split}"], (p for p in (_preference(f, rng, names) for f in fs) if p is not None)
        )
        counts[f"grpo_{split}"] = write_jsonl(
            paths[f"grpo_{split}"],
            ({"prompt": f["prompt"], "signature": f["signature"], "reference": f["source"]} for f in fs),
        )
    meta = {
        "format": FORMAT_VERSION,
        "fingerprint": fp,
        "counts": counts,
        "val_packages": list(DEMO_VAL_PACKAGES),
        "tokenizer": str(tokenizer_path) if tokenizer_path else None,
        "max_docs": max_docs,
        "seed": seed,
        "max_tokens": max_tokens,
    }
    write_jsonl(meta_path, [meta])  # one JSON object, written atomically like the rest
    return paths


def _fingerprint(tokenizer_path, max_docs, seed, max_tokens) -> str:
    tok_hash = hashlib.sha256(Path(tokenizer_path).read_bytes()).hexdigest()[:16] if tokenizer_path else None
    keyed = {
        "format": FORMAT_VERSION,
        "tokenizer": tok_hash,
        "max_docs": max_docs,
        "seed": seed,
        "max_tokens": max_tokens,
        "files": [str(p) for s in ("train", "val") for p in demo_files(s)[:max_docs]],
    }
    return hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------- functions from source files


def _functions(files) -> Iterator[dict]:
    """Every short, undecorated, documented function or method of the files, in file order."""
    for path in files:
        text = path.read_bytes().decode("utf-8", errors="replace")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # SyntaxWarning on odd escapes in old modules
                tree = ast.parse(text)
        except (SyntaxError, ValueError):
            continue
        lines = text.splitlines()
        for owner, node in _defs(tree):
            f = _function(node, owner, lines)
            if f is not None:
                yield f


def _defs(tree: ast.Module):
    """(class name or None, def node) for module-level functions and methods of module-level classes."""
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            yield None, node
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.FunctionDef):
                    yield node.name, item


def _function(node: ast.FunctionDef, owner: Optional[str], lines: list[str]) -> Optional[dict]:
    doc = ast.get_docstring(node)
    if node.decorator_list or not doc or node.end_lineno - node.lineno + 1 > MAX_LINES:
        return None
    body_start = node.body[0].lineno - node.lineno  # lines of the signature, which may span several
    code_start = node.body[1].lineno - node.lineno if len(node.body) > 1 else None
    if body_start == 0 or code_start is None:  # a one-line def, or nothing but a docstring
        return None
    source = textwrap.dedent("\n".join(lines[node.lineno - 1 : node.end_lineno]))
    if len(source) > MAX_CHARS or "\t" in source or not source.startswith("def "):
        return None
    # One canonical line for the signature, however it was wrapped in the file.
    stub = ast.FunctionDef(
        name=node.name, args=node.args, body=[ast.Pass()], decorator_list=[], returns=node.returns, type_comment=None
    )
    if "type_params" in ast.FunctionDef._fields:  # Python >= 3.12
        stub.type_params = getattr(node, "type_params", [])
    signature = ast.unparse(ast.fix_missing_locations(stub)).split("\n")[0]
    where = f"the method of class `{owner}`" if owner else "the Python function"
    prompt = f"Write {where} `{signature}`:\n{inspect.cleandoc(doc)}"
    return {"name": node.name, "prompt": prompt, "source": source, "signature": signature, "code_start": code_start}


def _unique(functions) -> list[dict]:
    seen, out = set(), []
    for f in functions:
        if f["source"] not in seen:
            seen.add(f["source"])
            out.append(f)
    return out


def _fitting(functions: list[dict], tokenizer_path, max_tokens: int) -> list[dict]:
    from training.data.tokenizer import load_tokenizer
    from training.posttrain.chat import encode_examples

    tok = load_tokenizer(tokenizer_path)
    encoded = encode_examples(tok, [{"prompt": f["prompt"], "completion": f["source"]} for f in functions], None)
    return [f for f, (ids, _) in zip(functions, encoded) if len(ids) + 1 <= max_tokens]


# ---------------------------------------------------------------- preference pairs


def _preference(f: dict, rng: random.Random, names: list[str]) -> Optional[dict]:
    lines = f["source"].split("\n")
    head, code = lines[: f["code_start"]], lines[f["code_start"] :]
    kind = rng.choices([k for k, _ in CORRUPTIONS], weights=[w for _, w in CORRUPTIONS])[0]
    rejected = None
    if kind == "shuffle" and len(set(code)) > 1:
        shuffled = code[:]
        while shuffled == code:
            rng.shuffle(shuffled)
        rejected = head + shuffled
    elif kind == "rename":
        others = [n for n in set(names) if n != f["name"] and not n.startswith("__")]
        if others:
            other = sorted(others)[rng.randrange(len(others))]
            rejected = [lines[0].replace(f"def {f['name']}(", f"def {other}(", 1)] + lines[1:]
    if rejected is None:  # unindent, or a fallback when the other kinds can't apply
        kind = "unindent"
        rejected = head + [line.lstrip() for line in code]
    rejected = "\n".join(rejected)
    if rejected == f["source"]:
        return None
    return {"prompt": f["prompt"], "chosen": f["source"], "rejected": rejected, "corruption": kind}
