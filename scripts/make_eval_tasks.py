"""Build the shipped task data from the demo corpus' held-out modules (json and email: never trained on).

    python scripts/make_eval_tasks.py          # rewrites jobs/tasks/data/stdlib_*.jsonl

stdlib_continuation: a function's first lines, then four candidate next lines: the real one and three
lines taken from other functions, re-indented like the real one so indentation gives nothing away.
stdlib_bodies: a function's signature and docstring (no final newline); the model writes the body,
which must parse. Each record keeps the real body as "reference" (the report compares lengths with it).
The files are shipped so every machine scores the same questions whatever its Python version.
"""

from __future__ import annotations

import ast
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from training.data.corpus import demo_files  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "jobs" / "tasks" / "data"


def _functions(path: Path) -> list[list[str]]:
    """Each function's source lines (ASCII, no blank lines), at least 6 of them."""
    source = path.read_text(encoding="utf-8", errors="replace")
    if not source.isascii():
        source = "\n".join(line for line in source.splitlines() if line.isascii())
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    lines = source.splitlines()
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.decorator_list:
            body = [line for line in lines[node.lineno - 1 : node.end_lineno] if line.strip()]
            if len(body) >= 6 and all(len(line) <= 100 for line in body):
                out.append(body)
    return out


def _dedent(lines: list[str]) -> list[str]:
    indent = len(lines[0]) - len(lines[0].lstrip())
    return [line[indent:] if line[:indent].isspace() or not line[:indent] else line.lstrip() for line in lines]


def continuation_questions(functions: list[list[str]], n: int, rng: random.Random) -> list[dict]:
    code_lines = sorted({line.strip() for f in functions for line in f[1:] if len(line.strip()) >= 8})
    questions = []
    for func in rng.sample(functions, len(functions)):
        func = _dedent(func)
        cut = rng.randint(3, min(len(func) - 1, 12))
        answer = func[cut]
        if len(answer.strip()) < 8 or answer.strip().startswith(("#", '"', "'")):
            continue
        indent = answer[: len(answer) - len(answer.lstrip())]
        distractors = []
        while len(distractors) < 3:
            line = rng.choice(code_lines)
            if line != answer.strip() and line not in distractors:
                distractors.append(line)
        choices = [answer] + [indent + d for d in distractors]
        order = list(range(4))
        rng.shuffle(order)
        questions.append(
            {"context": "\n".join(func[:cut]) + "\n", "choices": [choices[i] for i in order], "label": order.index(0)}
        )
        if len(questions) == n:
            break
    return questions


def instruction(node: ast.FunctionDef) -> str:
    """What a chat model is asked for the same function (metadata.chat_prompt), in the words of the
    demo SFT data (training/posttrain/demo_data.py)."""
    stub = ast.FunctionDef(
        name=node.name,
        args=node.args,
        body=[ast.Pass()],
        decorator_list=[],
        returns=node.returns,
        type_comment=None,
        type_params=[],
    )
    signature = ast.unparse(ast.fix_missing_locations(stub)).split("\n")[0]
    return f"Write the Python function `{signature}`:\n{ast.get_docstring(node)}"


def body_prompts(functions: list[list[str]], n: int, rng: random.Random) -> list[dict]:
    prompts = []
    for func in rng.sample(functions, len(functions)):
        func = _dedent(func)
        try:
            node = ast.parse("\n".join(func)).body[0]
        except SyntaxError:
            continue
        doc = node.body[0] if node.body else None
        if not (isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant) and isinstance(doc.value.value, str)):
            continue
        if len(node.body) < 2 or doc.end_lineno >= len(func) or doc.end_lineno > 12:
            continue
        # No final newline: "\n" + indentation is one token to a BPE trained on code, so a prompt cut
        # after the "\n" would leave the model at a token boundary it has rarely seen.
        # reference: the real body, which the eval report's len_ratio compares completions with
        prompts.append(
            {
                "prompt": "\n".join(func[: doc.end_lineno]),
                "instruction": instruction(node),
                "reference": "\n" + "\n".join(func[doc.end_lineno :]),
            }
        )
        if len(prompts) == n:
            break
    return prompts


def main() -> None:
    functions = [f for path in demo_files("val") for f in _functions(path)]
    OUT.mkdir(parents=True, exist_ok=True)
    for name, rows in (
        ("stdlib_continuation", continuation_questions(functions, 200, random.Random(0))),
        ("stdlib_bodies", body_prompts(functions, 40, random.Random(1))),
    ):
        path = OUT / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"{path}: {len(rows)} records from {len(functions)} functions")


if __name__ == "__main__":
    main()
