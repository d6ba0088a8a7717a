"""Rule-based rewards for GRPO, named in a job as `grpo.reward: module:function`, or several with weights as
`grpo.rewards: [{fn: ..., weight: ...}]`.

A reward function takes the sampled completion (text, stop token removed) and the prompt's
record from the grpo_*.jsonl file ({"prompt", "signature", ...}, with "truncated" added: whether the
completion ran out of grpo.max_new_tokens before its stop token) and returns a float. A function whose
parameters include `completions` is TRL's kind instead: called once per batch as
fn(prompts=[...], completions=[...], **columns) (each other record key as a list), returning a list of floats.

demo_body_reward, the demo's default, scores what a completion adds to its prompt: the body after the
docstring, against the reference's body (see its docstring for why each part is there).
"""

from __future__ import annotations

import ast
import difflib
import importlib
import inspect
import warnings
from typing import Callable, Optional, Sequence

from jobspec.posttrain_checks import parse_python

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
        tree = parse_python(source)
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
        tree = parse_python(source)
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


# A body shorter than this share of the reference's body earns proportionally less: `return None` under the
# right signature, once worth 0.70 of a full answer, is a few characters of a 100-character body.
BODY_LENGTH_FLOOR = 0.5


# Bodies that do nothing: they earn nothing, unless the reference's body is that very statement.
TRIVIAL_BODIES = frozenset({"pass", "...", "return", "return None", "return self", "raise NotImplementedError"})


def _body(function: ast.AST) -> str:
    """A function's code after its docstring, normalized by ast.unparse (comments and layout dropped); bare
    string statements (a docstring copied again) are not code and are left out."""
    statements = [
        n
        for n in function.body
        if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) and isinstance(n.value.value, str))
    ]
    return "\n".join(ast.unparse(n) for n in statements)


def _requested_function(completion: str, example: dict) -> Optional[ast.AST]:
    """The function the completion defines under the requested name (else its first), or None."""
    functions = _defined_functions(completion, example)
    wanted = requested_shape(example["signature"])
    named = [f for f in functions if wanted is not None and f.name == wanted[0]]
    return (named or functions or [None])[0]


def share_of_tests_passed(completion: str, example: dict, timeout_s: float = 5.0) -> Optional[float]:
    """The share of the record's tests ("test": one program, or "tests": a list) that pass with the completion's
    function defined, each run confined in the eval's sandbox (training/evaluate/sandbox.py); None without tests."""
    tests = example.get("tests") or ([example["test"]] if example.get("test") else [])
    if not tests:
        return None
    from training.evaluate.sandbox import passes

    function = _requested_function(completion, example)
    if function is None:
        return 0.0
    source = ast.unparse(function)
    return sum(passes(source + "\n\n" + test, timeout_s) for test in tests) / len(tests)


def demo_body_reward(completion: str, example: dict) -> float:
    """The demo's GRPO reward, 0..1, on the body alone (the code after the docstring):

        0                      truncated (example["truncated"]), unparsable, no code after the docstring, or
                               a body that does nothing (TRIVIAL_BODIES: pass, return None...)
        gate                   python_parses_partial: 1 for the requested signature, 0.75 its name, 0.5 another
        x similarity           difflib's ratio of the body to the reference's body, both normalized by ast
                               (averaged with the share of tests passed where the record has tests)
        x length               min(1, body length / (BODY_LENGTH_FLOOR x the reference body's length))

    Scoring the whole text let a policy earn most of the reward by copying the prompt's signature and
    docstring (the demo's `return None` bodies scored 0.70); here the prompt's part earns nothing."""
    if example.get("truncated"):
        return 0.0
    if "reference" not in example:
        raise ValueError(
            "demo_body_reward needs records with a 'reference' key (the function's real source, or its body); "
            "the demo's grpo_*.jsonl have it, derived again by training/posttrain/demo_data.py"
        )
    gate = python_parses_partial(completion, example)
    function = _requested_function(completion, example) if gate else None
    body = _body(function) if function is not None else ""
    if not body:
        return 0.0
    reference = _requested_function(example["reference"], example)
    wanted = _body(reference) if reference is not None else example["reference"].strip()
    if body in TRIVIAL_BODIES and body != wanted:
        return 0.0
    score = difflib.SequenceMatcher(None, body, wanted, autojunk=False).ratio()
    passed = share_of_tests_passed(completion, example)
    if passed is not None:
        score = (score + passed) / 2
    return gate * score * min(1.0, len(body) / max(1.0, BODY_LENGTH_FLOOR * len(wanted)))


def is_batched(fn: Callable) -> bool:
    """Whether a reward function is TRL's kind, called once per batch (it takes `completions`)."""
    try:
        return "completions" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def score_batch(fn: Callable, completions: Sequence[str], records: Sequence[dict]) -> list[float]:
    """One reward function over a batch: TRL's kind in one call with each record key as a column, ours per
    completion. A batched function must return one number per completion."""
    if not is_batched(fn):
        return [float(fn(c, r)) for c, r in zip(completions, records)]
    keys = {k for r in records for k in r if k != "prompt"}
    columns = {k: [r.get(k) for r in records] for k in keys}
    scores = fn(prompts=[r["prompt"] for r in records], completions=list(completions), **columns)
    scores = list(scores)
    if len(scores) != len(completions):
        raise ValueError(f"the reward function {fn.__name__} returned {len(scores)} scores for {len(completions)}")
    return [float("nan") if s is None else float(s) for s in scores]


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
