"""ruff's lint and format checks over the whole tree, with the rules pyproject.toml states."""

from __future__ import annotations

import shutil
import subprocess
import sys
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
