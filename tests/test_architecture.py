"""The layering (docs/architecture.md), checked as a reviewer would: contracts kept, no import cycle anywhere,
the control plane light, and no caller branching on a backend's name."""

from __future__ import annotations

import ast
import re
import subprocess
import sys

import grimp

from tests.conftest import REPO, env_for

PACKAGES = ("orchestrator", "training", "jobspec", "model")


def import_cycles(graph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), lazy imports included."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.find_modules_directly_imported_by(v):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return found


def test_import_contracts_are_kept(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "from importlinter.cli import lint_imports_command; lint_imports_command()",
            "--no-cache",
        ],
        cwd=REPO,
        env=env_for(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def test_no_import_cycles():
    graph = grimp.build_graph(*PACKAGES)
    assert import_cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    graph = grimp.ImportGraph()
    for module in ("a.x", "a.y", "a.z"):
        graph.add_module(module)
    graph.add_import(importer="a.x", imported="a.y")
    graph.add_import(importer="a.y", imported="a.x")
    graph.add_import(importer="a.z", imported="a.x")
    assert import_cycles(graph) == [["a.x", "a.y"]]


def test_orch_loads_no_torch_until_a_command_needs_it(tmp_path):
    code = (
        "import sys; import orchestrator.cli as c; c.build_parser(); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'training', 'model')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env_for(tmp_path), capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    loaded = ast.literal_eval(result.stdout.strip())
    assert not [m for m in loaded if m.split(".")[0] == "torch"], loaded
    assert [m for m in loaded if m.split(".")[0] == "training"] == [
        "training",
        "training.tools",
        "training.tools.sample",
    ]
    assert [m for m in loaded if m.split(".")[0] == "model"] == ["model", "model.config"]  # the shape: torch-free


def test_no_caller_branches_on_a_backend_name():
    """A backend is one file behind orchestrator/executors/base.py: nobody else asks which one it is."""
    branch = re.compile(r"""executor\s*[!=]=\s*["'](local|slurm)["']""")
    offenders = [
        f"{path.relative_to(REPO)}:{n}"
        for path in REPO.glob("orchestrator/**/*.py")
        if "executors" not in path.parts
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if branch.search(line)
    ]
    assert offenders == []
