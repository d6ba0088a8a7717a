"""The docs a user reads: generated tables equal what their results say, and the text speaks of the project alone."""

from __future__ import annotations

import re

import pytest

from conftest import REPO

from bench.doc_tables import TABLES, current


@pytest.mark.parametrize("doc,marker,make", TABLES, ids=[f"{d.name}:{m}" for d, m, _ in TABLES])
def test_each_generated_table_is_what_its_results_write(doc, marker, make):
    assert current(doc, marker) == make(), (
        f"{doc.relative_to(REPO)}'s <!-- {marker} --> table differs from bench/results: `python -m bench.run --docs`"
    )


# Words about the circumstances in which a text was written, which a user of the project cannot follow.
CIRCUMSTANCES = re.compile(
    r"\b(issue #?\d+|this stop|stop \d+|other agents?|lent (a |to |GPU)|no GPU lent|device tool|"
    r"PyPI mirror|this session|the lead engineer)\b",
    re.IGNORECASE,
)


def user_docs():
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), *sorted((REPO / "jobs").rglob("*.yaml"))]


@pytest.mark.parametrize("path", user_docs(), ids=lambda p: str(p.relative_to(REPO)))
def test_docs_speak_of_the_project_alone(path):
    hits = [
        f"{path.relative_to(REPO)}:{n}: {line.strip()}"
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if CIRCUMSTANCES.search(line)
    ]
    assert not hits, "\n".join(hits)


def test_the_circumstance_check_catches_what_it_names():
    assert CIRCUMSTANCES.search("fixed in issue 24") and CIRCUMSTANCES.search("until this stop it ran")
    assert not CIRCUMSTANCES.search("the issue of a stop signal: SIGUSR2")
