"""ruff's lint and format checks over the whole tree, with the rules pyproject.toml states, and no dead code: every
top-level function and class is named somewhere besides its definition."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from conftest import REPO


def ruff() -> str:
    found = Path(sys.executable).with_name("ruff")
    path = str(found) if found.exists() else shutil.which("ruff")
    if path is None:
        pytest.fail("ruff is not installed: pip install -e '.[test]'")
    return path


@pytest.mark.parametrize("command", [["check", "."], ["format", "--check", "."]], ids=["lint", "format"])
def test_ruff_is_clean(command):
    result = subprocess.run([ruff(), *command], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"`ruff {' '.join(command)}` (run `ruff format .` to fix formatting):\n" + (
        result.stdout[-4000:] + result.stderr[-2000:]
    )


CODE = ("jobspec", "orchestrator", "training", "model", "bench")
READERS = ("tests", "slurm", "scripts")  # code that may be the only caller of a function
NAMED_IN = ("*.toml", "docs/*.md", "jobs/**/*.yaml")  # entry points and job files name functions as text


def test_every_top_level_function_and_class_is_used():
    defined: dict[str, list[str]] = {}
    words: Counter = Counter()
    for folder in CODE + READERS:
        for path in sorted((REPO / folder).rglob("*.py")):
            source = path.read_text()
            words.update(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", source))
            if folder in CODE:
                for node in ast.parse(source).body:
                    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                        defined.setdefault(node.name, []).append(str(path.relative_to(REPO)))
    for pattern in NAMED_IN:
        for path in REPO.glob(pattern):
            words.update(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", path.read_text()))
    unused = {name: where for name, where in defined.items() if words[name] <= len(where) and not name.startswith("__")}
    assert not unused, f"defined and never named elsewhere (dead code?): {unused}"
