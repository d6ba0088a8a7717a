"""The data curation job (kind: data, training/data/curate/): deduplication quality on planted copies, each
filter and PII rule on hand-made examples, decontamination, restarts that skip finished tasks, the job through
`orch submit`, and bad input refused with exit 2."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from conftest import REPO, env_for
from test_slurm_cluster import slurm_cluster, wait_until  # noqa: F401  (the session fixture)

from jobspec import load_spec
from jobspec.curate_schema import (
    C4Config,
    CodeFilterConfig,
    FineWebConfig,
    GopherQualityConfig,
    GopherRepetitionConfig,
    PIIConfig,
)
from training.data.corpus import demo_files, is_val
from training.data.curate import decontam, pii
from training.data.curate.filters import c4, code, fineweb, gopher
from training.data.curate.local import run_stage
from training.data.curate.plan import make_plan
from training.data.curate.publish import STOP_EXIT, done_record, task_dir

JOB = str(REPO / "jobs" / "data.yaml")
EDIT_SHARE = 0.03  # near copies: this share of their lines rewritten


def _stdlib_sample(n: int, seed: int) -> list[Path]:
    """Files of 2-40 KB from the demo corpus, outside encodings/ (its codec tables are the standard library's own
    near-copy family: they would count as 'untouched files removed' though they are true near duplicates)."""
    files = [p for p in demo_files("train") if 2_000 <= p.stat().st_size <= 40_000 and "encodings" not in p.parts]
    return random.Random(seed).sample(files, n)


def _edit_lines(text: str, rng: random.Random) -> str:
    lines = text.split("\n")
    for i in rng.sample(range(len(lines)), max(1, round(EDIT_SHARE * len(lines)))):
        lines[i] = f"    value_{rng.randrange(10**6)} = compute({rng.randrange(100)})  # changed"
    return "\n".join(lines)


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> dict:
    """120 untouched files, 20 verbatim copies under other names, 20 copies with 3% of lines edited, and bad files.
    Names sort originals first, so a copy (not its original) is the one removed."""
    root = tmp_path_factory.mktemp("planted")
    src = root / "corpus"
    src.mkdir()
    rng = random.Random(0)
    sample = _stdlib_sample(160, seed=1)
    originals = {}
    for i, path in enumerate(sample[:120]):
        originals[i] = src / f"a_{i:03d}_{path.stem}.py"
        originals[i].write_bytes(path.read_bytes())
    exact, near = {}, {}
    for k, i in enumerate(rng.sample(range(120), 40)):
        target = src / f"b_copy_{k:03d}.py"
        if k < 20:
            target.write_bytes(originals[i].read_bytes())
            exact[target.name] = originals[i].name
        else:
            target.write_text(_edit_lines(originals[i].read_text(), rng))
            near[target.name] = originals[i].name
    (src / "c_binary.py").write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 4)
    (src / "c_latin1.py").write_bytes("caf\u00e9 = 'cr\u00e8me br\u00fbl\u00e9e'\n".encode("latin-1"))
    (src / "c_empty.py").write_bytes(b"")
    (src / "c_blank.txt").write_bytes(b"  \n\n\t\n")
    run_dir = root / "run"
    cfg = load_spec(
        JOB,
        [f"data.sources=[{src}]", "data.val_fraction=0", "curate.decontamination.enabled=false", "curate.workers=2"],
    )
    run_dir.mkdir()
    from omegaconf import OmegaConf

    OmegaConf.save(cfg, run_dir / "config.yaml")
    make_plan(cfg, run_dir, workers=2)
    stats = run_stage(run_dir, workers=2)
    removed = [json.loads(line) for line in (run_dir / "removed.jsonl").read_text().splitlines()]
    return {
        "src": src,
        "run_dir": run_dir,
        "stats": stats,
        "removed": removed,
        "exact": exact,
        "near": near,
        "originals": {p.name for p in originals.values()},
    }


def _by_name(removed: list[dict]) -> dict[str, dict]:
    return {Path(r["source"]).name: r for r in removed}


def test_planted_copies_are_found_and_untouched_files_kept(planted):
    removed = _by_name(planted["removed"])
    exact_found = [
        n
        for n, orig in planted["exact"].items()
        if removed.get(n, {}).get("reason") == "exact_duplicate" and Path(removed[n]["kept"]["source"]).name == orig
    ]
    near_found = [
        n
        for n, orig in planted["near"].items()
        if removed.get(n, {}).get("reason") == "near_duplicate" and Path(removed[n]["kept"]["source"]).name == orig
    ]
    assert len(exact_found) / len(planted["exact"]) == 1.0
    assert len(near_found) / len(planted["near"]) >= 0.95, {n: removed.get(n) for n in planted["near"]}
    untouched_removed = [
        n for n in planted["originals"] if removed.get(n, {}).get("reason") in ("exact_duplicate", "near_duplicate")
    ]
    assert len(untouched_removed) / len(planted["originals"]) < 0.01, untouched_removed
    stats = planted["stats"]
    assert stats["exact_duplicates"] == len(exact_found) and stats["near_duplicates"] >= len(near_found)


def test_bad_files_are_counted_and_listed_never_fatal(planted):
    removed = _by_name(planted["removed"])
    assert {n: removed[n]["detail"] for n in ("c_binary.py", "c_latin1.py", "c_empty.py", "c_blank.txt")} == {
        "c_binary.py": "binary",
        "c_latin1.py": "not_utf8",
        "c_empty.py": "empty",
        "c_blank.txt": "empty",
    }
    assert all(removed[n]["reason"] == "unreadable" for n in ("c_binary.py", "c_latin1.py", "c_empty.py"))
    assert planted["stats"]["unreadable_by_kind"] == {"binary": 1, "empty": 2, "not_utf8": 1}


def test_outputs_stats_report_and_corpus(planted):
    run_dir, stats = planted["run_dir"], planted["stats"]
    on_disk = json.loads((run_dir / "stats.json").read_text())
    for key in (
        "input_docs",
        "output_docs",
        "unreadable",
        "exact_duplicates",
        "near_duplicates",
        "filtered",
        "pii_redactions",
        "decontaminated",
        "bytes_in",
        "bytes_out",
    ):
        assert key in on_disk, key
    assert on_disk["input_docs"] == 164 and on_disk["unreadable"] == 4
    funnel = {row["step"]: row["docs"] for row in on_disk["funnel"]}
    assert funnel["read"] == 160 and funnel["exact_dedup"] == 160 - stats["exact_duplicates"]
    assert (
        funnel["decontamination"]
        == on_disk["output_docs"]
        == (160 - stats["exact_duplicates"] - stats["near_duplicates"] - sum(stats["filtered"].values()))
    )
    assert len(planted["removed"]) == on_disk["input_docs"] - on_disk["output_docs"]
    written = [
        json.loads(line)
        for part in sorted((run_dir / "corpus" / "train").glob("part-*.jsonl"))
        for line in part.read_text().splitlines()
    ]
    assert (
        len(written) == on_disk["output_docs"] and sum(len(d["text"].encode()) for d in written) == on_disk["bytes_out"]
    )
    report = (run_dir / "report.md").read_text()
    assert "| step | documents | MB | removed here |" in report and "![funnel](funnel.png)" in report
    assert (run_dir / "funnel.png").stat().st_size > 5_000
    # the cleaned corpus reads back through pretraining's reader, already split
    from types import SimpleNamespace

    from training.data.corpus import iter_documents

    data = SimpleNamespace(sources=[str(run_dir / "corpus")], text_field="text", val_fraction=0.5, max_docs=None)
    assert sum(1 for _ in iter_documents(data, "train")) == on_disk["output_docs"]
    assert sum(1 for _ in iter_documents(data, "val")) == 0  # val_fraction=0 in this run: nothing held out


# ------------------------------------------------------------------ filters and PII, on hand-made examples

PROSE = (
    "The committee met on Tuesday to discuss the budget. It was agreed that the library would have new "
    "opening hours, and that the park should be cleaned with the help of volunteers. Members of the public "
    "were invited to comment, and several of them spoke about the need for better lighting in the evening. "
    "The chair thanked everyone for coming and closed the meeting at nine.\n"
) * 2
CODE = "def add(a, b):\n    \"\"\"Return the sum.\"\"\"\n    return a + b\n\n\nprint(add(1, 2))\n"


@pytest.mark.parametrize(
    "text, reason",
    [
        (CODE, None),
        ("x = 1\n" + "y = '" + "a" * 1200 + "'\n", "a line of"),
        ("\n".join(["z = '" + "q" * 150 + "'"] * 5), "mean line length"),
        ("# ---- ++++ ==== ----\n" * 20, "alphanumeric fraction"),
        ("# This file is automatically generated. Do not edit.\n" + CODE, "auto-generated"),
        (
            "DATA = (\n"
            + "\n".join(["QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo0123456789abcdefghijklmnopqrstuv"] * 20)
            + ")\n",
            "encoded data",
        ),
        (
            "T = [\n"
            + ",\n".join(", ".join(f"0x{i:02x}" for i in range(r, r + 12)) for r in range(0, 240, 12))
            + "]\n",
            "encoded data",
        ),
    ],
)
def test_code_filter(text, reason):
    _, why = code.check(text, CodeFilterConfig())
    assert (why is None) if reason is None else (why is not None and reason in why), why


def test_prose_filters_keep_prose_and_reject_what_they_describe():
    assert gopher.quality(PROSE, GopherQualityConfig())[1] is None
    assert "words" in gopher.quality("just a few words here", GopherQualityConfig())[1]
    assert "stop words" in gopher.quality(" ".join(["lorem dolor amet sit"] * 20), GopherQualityConfig())[1]
    assert "symbol/word" in gopher.quality(("# comment " * 3 + "the and of\n") * 30, GopherQualityConfig())[1]
    assert gopher.repetition(PROSE.split("\n")[0], GopherRepetitionConfig())[1] is None
    assert "lines are repeated" in gopher.repetition("buy now\n" * 10 + "ok\n", GopherRepetitionConfig())[1]
    text, why = c4.check(PROSE + "Please enable Javascript to view this page.\nshort line\n", C4Config())
    assert why is None and "Javascript" not in text and "short line" not in text and "committee" in text
    assert "curly bracket" in c4.check(PROSE + "{x}", C4Config())[1]
    assert "lorem ipsum" in c4.check("Lorem ipsum dolor sit amet. " + PROSE, C4Config())[1]
    assert fineweb.check(PROSE.split("\n")[0], FineWebConfig())[1] is None
    assert "repeated lines" in fineweb.check(PROSE, FineWebConfig())[1]  # the paragraph twice
    assert "short" in fineweb.check("\n".join(f"item {i}." for i in range(30)), FineWebConfig())[1]


def test_pii_rules():
    text = (
        "contact: Jane Roe <jane.roe@example.org>\n"
        "dns = ['8.8.8.8', '2001:4860:4860::8888']\nlocal = ('127.0.0.1', '192.168.1.20', '10.0.0.1')\n"
        "slice = x[::2]\nversion = '3.11.2'\n"
        "aws = 'AKIAIOSFODNN7EXAMPLE'\ngh = 'ghp_aBcDeFgHiJkLmNoPqRsTuVwXyZ0123456789'\n"
        "api_key = \"q8Zr3kP9xW2mT7vB1nL5sQ\"\npassword = 'correcthorse'\n"
        "-----BEGIN RSA PRIVATE KEY-----\nMIIBOgIBAAJBAKj34GkxFhD90vcNLYLInFEX6Ppy1tPf9Cnzj4p4WGeKLs1Pt8Qu\n"
        "-----END RSA PRIVATE KEY-----\n"
    )
    out, counts = pii.redact(text, PIIConfig())
    assert counts == Counter({"secret": 4, "ip_address": 2, "email": 1})
    assert "jane.roe" not in out and "<EMAIL>" in out
    assert "8.8.8.8" not in out and "4860" not in out and out.count("<IP_ADDRESS>") == 2
    for kept in ("127.0.0.1", "192.168.1.20", "10.0.0.1", "x[::2]", "'3.11.2'", "password = 'correcthorse'"):
        assert kept in out  # private addresses, slices, versions and low-entropy passwords stay
    assert "AKIA" not in out and "ghp_" not in out and "q8Zr3" not in out and "MIIBOg" not in out
    assert pii.redact(text, PIIConfig(emails=False, ip_addresses=False, secrets=False))[0] == text


# ------------------------------------------------------------------ decontamination


def test_decontamination_against_tasks_and_the_heldout_split(tmp_path):
    from training.evaluate.tasks import load_task

    record = load_task(REPO / "jobs/tasks/stdlib_continuation.yaml").docs[0]
    words = " ".join(record["context"].split())
    src = tmp_path / "src"
    src.mkdir()
    heldout_text = (
        "the quick brown fox jumps over the lazy dog while seven tired wizards quietly brew strong "
        "coffee in the old stone tower"
    )
    val_name = next(f"held_{i}.txt" for i in range(1000) if is_val(f"held_{i}.txt", 0, 0.5))
    train_names = [f"t_{i}.txt" for i in range(1000) if not is_val(f"t_{i}.txt", 0, 0.5)][:4]
    (src / val_name).write_text(heldout_text)
    docs = {
        train_names[0]: "notes about code\n" + words + "\nmore notes",  # a task's context, verbatim
        train_names[1]: "a story: " + " ".join(heldout_text.split()[:13]) + " and then it ended",  # 13 words
        train_names[2]: "a story: " + " ".join(heldout_text.split()[:12]) + " and then it ended",  # 12: kept
        train_names[3]: "nothing in common with anything else in this little corpus of ours today",
    }
    for name, text in docs.items():
        (src / name).write_text(text)
    stats, removed = _run_small(
        tmp_path, src, ["data.val_fraction=0.5", "curate.near_dedup.enabled=false", "curate.filters.code.enabled=false"]
    )
    reasons = {Path(r["source"]).name: r.get("reference") for r in removed}
    assert reasons == {train_names[0]: "task:stdlib_continuation", train_names[1]: "heldout"}
    assert stats["decontaminated"] == 2 and stats["heldout_docs"] == 1
    assert decontam.match("x " + words, {"t": decontam.text_ngrams(words, 13)}, 13) == "t"


def _run_small(tmp_path: Path, src: Path, overrides: list[str], workers: int = 1):
    from omegaconf import OmegaConf

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = load_spec(JOB, [f"data.sources=[{src}]", *overrides])
    OmegaConf.save(cfg, run_dir / "config.yaml")
    make_plan(cfg, run_dir, workers)
    stats = run_stage(run_dir, workers)
    return stats, [json.loads(line) for line in (run_dir / "removed.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------ restarts, the job, bad input


def _small_source(root: Path, n: int = 24) -> Path:
    src = root / "small"
    src.mkdir()
    for path in _stdlib_sample(n, seed=2):
        (src / f"{path.parent.name}_{path.name}").write_bytes(path.read_bytes())
    (src / "zz_copy.py").write_bytes(next(iter(sorted(src.iterdir()))).read_bytes())
    return src


def _train_main(tmp: Path, run_dir: Path, overrides: list[str], stop: str | None = None):
    env = env_for(tmp)
    env.pop("ORCH_CURATE_STOP", None)
    if stop:
        env["ORCH_CURATE_STOP"] = stop
    return subprocess.run(
        [sys.executable, "-m", "training.main", JOB, *overrides, "--run-dir", str(run_dir)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_a_restart_skips_the_tasks_that_finished(tmp_path):
    src = _small_source(tmp_path)
    overrides = [f"data.sources=[{src}]", "data.val_fraction=0.1", "curate.shards=4", "curate.workers=1"]
    run_dir = tmp_path / "run"
    first = _train_main(tmp_path, run_dir, overrides, stop="analyze/00001")
    assert first.returncode == STOP_EXIT, first.stdout + first.stderr
    done = {s: done_record(task_dir(run_dir, "analyze", s)) for s in range(4)}
    assert done[0] is not None and done[1] is not None and done[2] is None and done[3] is None
    assert not (run_dir / "stats.json").exists()

    second = _train_main(tmp_path, run_dir, overrides)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "2 shards had been analyzed by an earlier attempt: skipped" in second.stdout
    for s in (0, 1):  # not redone: the same marker, from the first process
        assert done_record(task_dir(run_dir, "analyze", s)) == done[s]
    assert all(done_record(task_dir(run_dir, "analyze", s))["pid"] != done[0]["pid"] for s in (2, 3))

    fresh = tmp_path / "fresh"
    assert _train_main(tmp_path, fresh, overrides).returncode == 0
    for split in ("train", "val"):
        assert _read_parts(run_dir / "corpus" / split) == _read_parts(fresh / "corpus" / split)
    restarted, clean = (json.loads((d / "stats.json").read_text()) for d in (run_dir, fresh))
    assert restarted["funnel"] == clean["funnel"] and restarted["exact_duplicates"] == clean["exact_duplicates"] == 1


def _read_parts(folder: Path) -> list[str]:
    return [line for part in sorted(folder.glob("part-*.jsonl")) for line in part.read_text().splitlines()]


def test_the_job_through_orch_submit_and_status(tmp_path):
    from orchestrator.registry import Registry
    from orchestrator.status.collect import Collector

    src = _small_source(tmp_path)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "orchestrator.cli",
            "submit",
            JOB,
            f"data.sources=[{src}]",
            f"runs_dir={tmp_path / 'runs'}",
            "executor=local",
            "--follow",
        ],
        cwd=tmp_path,
        env=env_for(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    registry = Registry(tmp_path / ".orch" / "registry.db")
    run = registry.list()[0]
    assert run.kind == "data" and run.state == "COMPLETED"
    run_dir = Path(run.run_dir)
    stats = json.loads((run_dir / "stats.json").read_text())
    assert stats["input_docs"] == 25 - stats["heldout_docs"] and stats["exact_duplicates"] == 1
    assert (run_dir / "report.md").is_file() and (run_dir / "removed.jsonl").is_file()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == sorted(r["step"] for r in records) and records[-1]["step"] == 25
    row = next(j for j in Collector(registry, use_slurm=False).collect().jobs if j.run_id == run.id)
    assert (row.step, row.max_steps) == (25, 25)


@pytest.mark.parametrize(
    "override, names",
    [
        ("curate.filters.gopher_qualty.enabled=true", ["curate.filters.gopher_qualty.enabled", "gopher_quality"]),
        ("curate.near_dedup.threshold=1.5", ["curate.near_dedup.threshold", "1.5"]),
        ("curate.filters.code.min_alnum_fraction=-0.1", ["curate.filters.code.min_alnum_fraction", "-0.1"]),
        ("data.sources=[/no/such/folder]", ["data.sources[0]", "/no/such/folder"]),
    ],
)
def test_bad_input_is_refused_with_exit_2(tmp_path, override, names):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "orchestrator.cli",
            "submit",
            JOB,
            override,
            f"runs_dir={tmp_path / 'runs'}",
            "executor=local",
        ],
        cwd=tmp_path,
        env=env_for(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    message = result.stderr.strip()
    assert message.startswith("error: ") and message.count("\n") == 0
    assert all(name in message for name in names), message
    assert not (tmp_path / "runs").exists()  # nothing registered, nothing written
    assert (
        not os.path.exists(tmp_path / ".orch" / "registry.db")
        or not subprocess.run(
            [sys.executable, "-m", "orchestrator.cli", "runs"],
            cwd=tmp_path,
            env=env_for(tmp_path),
            capture_output=True,
            text=True,
        )
        .stdout.strip()
        .splitlines()[1:]
    )


@pytest.mark.slurm
def test_the_job_runs_as_slurm_job_arrays(tmp_path, slurm_cluster):  # noqa: F811  (the session fixture)
    from orchestrator.executors.slurm import SlurmExecutor
    from orchestrator.executors.slurm_array import job_ids
    from orchestrator.registry import Registry

    src = _small_source(tmp_path, n=8)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "orchestrator.cli",
            "submit",
            JOB,
            f"data.sources=[{src}]",
            f"runs_dir={tmp_path / 'runs'}",
            "executor=slurm",
            "curate.shards=3",
        ],
        cwd=tmp_path,
        env=env_for(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    registry = Registry(tmp_path / ".orch" / "registry.db")
    run = registry.list()[0]
    ids = job_ids(run)
    assert run.executor == "slurm" and len(ids) == 4 and run.slurm_job_id == ids[-1]

    def finished():
        SlurmExecutor(registry).refresh([registry.get(run.id)])
        current = registry.get(run.id)
        return current if current.finished else None

    done = wait_until(finished, 240, f"data run {run.id} (Slurm jobs {ids})", interval=2)
    assert done.state == "COMPLETED", done.reason
    stats = json.loads((Path(run.run_dir) / "stats.json").read_text())
    assert stats["shards"] == 3 and stats["exact_duplicates"] == 1
    sacct = subprocess.run(
        ["sacct", "-X", "-n", "-P", "-j", ids[0], "-o", "JobID,State"], capture_output=True, text=True, timeout=60
    ).stdout.split()
    assert sorted(sacct) == [f"{ids[0]}_{i}|COMPLETED" for i in range(3)]  # one array task per shard
