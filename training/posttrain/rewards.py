"""Rule-based rewards for GRPO, named in a job as `grpo.reward: module:function`.

A reward function takes the sampled completion (text, stop token removed) and the prompt's
record from the grpo_*.jsonl file ({"prompt", "signature", ...}) and returns a float.
"""

from __future__ import annotations

import ast
import importlib
import warnings
from typing import Callable, Optional

RewardFn = Callable[[str, dict], float]


def _function_shape(node: ast.AST) -> tuple[str, str]:
    """A function's name and its parameter list (names, defaults, annotations), comparable with ==."""
    return node.name, ast.dump(node.args)


def requested_shape(signature: str) -> Optional[tuple[str, str]]:
    """The (name, parameters) of a signature such as 'def f(a, b=1) -> int:'; None if it isn't one."""
    text = signature.strip()
    if not text.endswith(":"):
        text += ":"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # SyntaxWarning on odd escapes in defaults
            tree = ast.parse(text + "\n    pass\n")
    except (SyntaxError, ValueError):
        return None
    node = tree.body[0] if tree.body else None
    return _function_shape(node) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else None


def _parse(source: str) -> Optional[ast.Module]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return ast.parse(source)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None


def python_parses(completion: str, example: dict) -> float:
    """1.0 when the completion is valid Python that defines the requested function with its exact
    signature (name, parameters, defaults, annotations), else 0.0.

    The completion may be the whole function, or only its body when the prompt ended with the
    signature line; both are accepted."""
    wanted = requested_shape(example["signature"])
    if wanted is None:
        raise ValueError(f"python_parses: the record's signature {example['signature']!r} is not a Python def")
    header = example["signature"].rstrip()
    header = header if header.endswith(":") else header + ":"
    for source in (completion, header + "\n" + completion):
        tree = _parse(source)
        if tree is None:
            continue
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _function_shape(node) == wanted:
                return 1.0
    return 0.0


def _defined_functions(completion: str, example: dict) -> list[ast.AST]:
    """The functions a completion defines at its top level ([] if it doesn't parse), trying it as a
    whole function and as a body after the prompt's signature line."""
    header = example["signature"].rstrip()
    header = header if header.endswith(":") else header + ":"
    for source in (completion, header + "\n" + completion):
        tree = _parse(source)
        if tree is not None:
            found = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
            if found:
                return found
    return []


def defines_function(completion: str, example: dict) -> float:
    """1.0 when the completion parses as Python and defines a function (any name or signature)."""
    return 1.0 if _defined_functions(completion, example) else 0.0


def python_parses_partial(completion: str, example: dict) -> float:
    """python_parses with partial credit, for a model that rarely gets the signature right (its groups
    would otherwise all score 0 and teach nothing): 1.0 for the exact signature, 0.75 for the requested
    name with other parameters, 0.5 for valid Python defining some other function, else 0."""
    if python_parses(completion, example):
        return 1.0
    wanted = requested_shape(example["signature"])
    functions = _defined_functions(completion, example)
    if not functions:
        return 0.0
    return 0.75 if wanted is not None and any(f.name == wanted[0] for f in functions) else 0.5


def parses_and_resembles(completion: str, example: dict) -> float:
    """python_parses_partial (the parse gate with partial credit) times the similarity of the completion
    to the record's reference implementation (difflib's ratio, 0..1). A policy that answers every prompt
    with one short body that parses (`return self`) scores near 0 here: parsing alone pays nothing.
    Needs records with a "reference" (the demo's grpo files have one)."""
    if "reference" not in example:
        raise ValueError(
            "parses_and_resembles needs records with a 'reference' key (the function's real source); "
            "the demo's grpo_*.jsonl have it, derived again by training/posttrain/demo_data.py"
        )
    gate = python_parses_partial(completion, example)
    if not gate:
        return 0.0
    import difflib

    return (
        gate * difflib.SequenceMatcher(None, completion.strip(), example["reference"].strip(), autojunk=False).ratio()
    )


def load_reward_fn(spec: str) -> RewardFn:
    """`package.module:function` -> the function; a ValueError naming the spec when it can't be found."""
    module_name, _, name = spec.partition(":")
    if not module_name or not name:
        raise ValueError(
            f"grpo.reward={spec!r} must be 'module:function' "
            "(e.g. training.posttrain.rewards:python_parses) or a reward-model run folder"
        )
    try:
        fn = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"grpo.reward={spec!r}: {e}") from None
    if not callable(fn):
        raise ValueError(f"grpo.reward={spec!r} is not a function")
    return fn
