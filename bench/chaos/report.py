"""The chaos table in docs/reliability.md, between <!-- chaos --> and <!-- /chaos -->, from a results record."""

from __future__ import annotations

from bench.chaos.config import REPO
from bench.common import write_between_markers
from bench.chaos.kinds import KINDS

DOC = REPO / "docs" / "reliability.md"


def table(record: dict) -> str:
    rec = record["recovery_s"]
    lines = [
        f"Measured {record['date']} on {record['device']} (`{record['command']}`, seed {record['seed']}):",
        "",
        "| figure | value | target |",
        "|---|---|---|",
    ]
    n = record["faults"]
    for name, target in (
        ("faults", n),
        ("finished", n),
        ("bitwise_equal", n),
        ("checkpoints_lost", 0),
        ("crash_loops", 0),
        ("orphans", 0),
        ("leftovers", 0),
        ("wrong_state", 0),
        ("not_fired", 0),
        ("wrong_restarts", 0),
    ):
        if name in record:  # (a record written before the harness counted these has none)
            lines.append(f"| {name} | {record[name]} | {target} |")
    lines.append(
        f"| recovery (s), median / max | {rec['median']} / {rec['max']} ({rec['measured']} faults with a restart) | |"
    )
    lines.append(f"| two trainers on one run folder (seen) | {record['two_trainers']} | 0 |")
    lines += ["", "| kind | faults | as expected | ran on |", "|---|---|---|---|"]
    for kind, k in record["by_kind"].items():
        lines.append(f"| {kind}. {KINDS[int(kind)].name} | {k['faults']} | {k['ok']} | {', '.join(k['executors'])} |")
    return "\n".join(lines)


def update_doc(record: dict) -> None:
    write_between_markers(DOC, "chaos", table(record))
