"""The data pipeline on real files: tokenizer, corpus, prepare (MDS shards) and resumable loading."""

from __future__ import annotations

import json
import os
import random
import select
import signal
import subprocess
import sys
import sysconfig
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from jobspec.schema import DataConfig
from training.data import DataError
from training.data.corpus import demo_files, iter_documents
from training.data.loader import TokenLoader, iter_val_batches
from training.data.prepare import ensure_data, prepare_data
from training.data.tokenizer import EOS, EOS_ID, SPECIAL_TOKENS, load_tokenizer, token_byte_lengths, train_tokenizer

REPO = Path(__file__).resolve().parents[1]
WORDS = [
    "the",
    "model",
    "naïve",
    "café",
    "中文",
    "日本語",
    "🤗",
    "emoji 🎉",
    "data",
    "\n",
    "\t",
    "  ",
    "def",
    "return",
    "x = 1",
    "Ω",
    "ß",
    "\r\n",
    "token",
    "<|endoftext|>",
]


def make_docs(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [f"doc {seed}-{i}: " + " ".join(rng.choices(WORDS, k=rng.randint(10, 60))) for i in range(n)]


# ---------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def tok():
    texts = [p.read_text(encoding="utf-8") for p in demo_files("train")[:10]] + make_docs(50, 0)
    return train_tokenizer(texts, 400)


def test_special_tokens_are_reserved_first(tok):
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
    assert tok.token_to_id(EOS) == EOS_ID == 0
    assert tok.get_vocab_size() == 400


@pytest.mark.parametrize(
    "text",
    [
        "",
        "é",
        "中文 and 日本語",
        "emoji 🤗🎉",
        "  two leading spaces",
        "\n\n\tindented",
        "trailing  \n",
        "a\r\nb",
        "\x00\x7f",
        "text with <|endoftext|> inside",
        " <|pad|>",
    ],
)
def test_round_trip_and_byte_lengths(tok, text):
    ids = tok.encode(text).ids
    assert tok.decode(ids) == text
    assert EOS_ID not in ids  # special tokens only ever come from their ids, never from text
    assert token_byte_lengths(tok)[ids].sum() == len(text.encode("utf-8"))


@settings(max_examples=300, deadline=None)
@given(text=st.text())
def test_round_trip_property(tok, text):
    ids = tok.encode(text).ids
    assert tok.decode(ids) == text
    assert token_byte_lengths(tok)[ids].sum() == len(text.encode("utf-8"))


def test_byte_lengths_of_special_tokens_are_zero(tok):
    lengths = token_byte_lengths(tok)
    assert lengths.shape == (400,) and list(lengths[:4]) == [0, 0, 0, 0] and (lengths[4:] > 0).all()


def test_load_tokenizer(tok, tmp_path):
    tok.save(str(tmp_path / "tokenizer.json"))
    loaded = load_tokenizer(tmp_path / "tokenizer.json")
    assert loaded.encode("héllo <|endoftext|>").ids == tok.encode("héllo <|endoftext|>").ids
    with pytest.raises(DataError, match="no tokenizer file"):
        load_tokenizer(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text('{"hello": 1}')
    with pytest.raises(DataError, match="not a Hugging Face tokenizer.json"):
        load_tokenizer(tmp_path / "bad.json")


# ---------------------------------------------------------------- corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> list[str]:
    """One .jsonl, a folder of .txt files (and a README that is skipped) and one .parquet."""
    root = tmp_path_factory.mktemp("corpus")
    lines = [json.dumps({"id": i, "text": d}) for i, d in enumerate(make_docs(60, 1))]
    (root / "docs.jsonl").write_text("\n".join(lines[:30] + [""] + lines[30:]) + "\n", encoding="utf-8")
    (root / "txt" / "sub").mkdir(parents=True)
    for i, d in enumerate(make_docs(10, 2)):
        (root / "txt" / ("sub" if i % 2 else "") / f"{i:02}.txt").write_bytes(d.encode("utf-8"))
    (root / "txt" / "README.md").write_text("not a document")
    pq.write_table(
        pa.table({"text": make_docs(40, 3), "n": list(range(40))}), root / "books.parquet", row_group_size=16
    )
    return [str(root / "docs.jsonl"), str(root / "txt"), str(root / "books.parquet")]


def small_cfg(sources, data_dir, **kw) -> DataConfig:
    return DataConfig(sources=sources, dir=str(data_dir), vocab_size=300, seq_len=32, val_fraction=0.2, **kw)


def test_split_is_deterministic_and_disjoint(corpus, tmp_path):
    cfg = small_cfg(corpus, tmp_path)
    train, val = list(iter_documents(cfg, "train")), list(iter_documents(cfg, "val"))
    assert len(train) + len(val) == 110 and 5 < len(val) < 40
    assert not set(train) & set(val)
    assert "not a document" not in train + val
    # The hold-out hashes (file, record index): reading the sources in another order moves nothing.
    reordered = replace(cfg, sources=corpus[::-1])
    assert set(iter_documents(reordered, "val")) == set(val)
    assert len(list(iter_documents(replace(cfg, max_docs=4), "val"))) == 4


def test_demo_corpus_holds_out_json_and_email():
    root = Path(sysconfig.get_paths()["stdlib"])
    val = [p.relative_to(root) for p in demo_files("val")]
    train = [p.relative_to(root) for p in demo_files("train")]
    assert Path("json/__init__.py") in val and Path("email/message.py") in val
    assert all(p.parts[0] in ("json", "email") for p in val)
    assert len(train) > 300 and not any(p.parts[0] in ("json", "email") for p in train)
    assert not any({"test", "tests", "idlelib", "site-packages"} & set(p.parts[:-1]) for p in train)
    assert train == sorted(train)


def test_bad_sources_are_named(tmp_path):
    missing = str(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="data.sources") as e:
        list(iter_documents(small_cfg([missing], tmp_path), "train"))
    assert missing in str(e.value)
    (tmp_path / "table.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=r"data.sources.*\.csv file"):
        list(iter_documents(small_cfg([str(tmp_path / "table.csv")], tmp_path), "train"))
    (tmp_path / "x.jsonl").write_text('{"body": "hi"}\n')
    with pytest.raises(DataError, match=r"x.jsonl:1.*'text'"):
        list(iter_documents(small_cfg([str(tmp_path / "x.jsonl")], tmp_path), "train"))


# ---------------------------------------------------------------- prepare


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory):
    cfg = small_cfg(corpus, tmp_path_factory.mktemp("prepared") / "data")
    return cfg, prepare_data(cfg, progress=False)


def read_samples(split_dir: Path) -> list[np.ndarray]:
    from streaming import StreamingDataset

    ds = StreamingDataset(local=str(split_dir), batch_size=1)
    return [ds[i]["tokens"] for i in range(ds.num_samples)]


@pytest.mark.parametrize("split", ["train", "val"])
def test_prepare_packs_documents_separated_by_eos(prepared, split):
    cfg, meta = prepared
    tok = load_tokenizer(Path(cfg.dir) / "tokenizer.json")
    samples = read_samples(Path(cfg.dir) / split)
    assert len(samples) == meta["splits"][split]["samples"] > 0
    assert all(s.dtype == np.uint16 and s.shape == (cfg.seq_len + 1,) for s in samples)
    ids = np.concatenate(samples)
    ends = np.flatnonzero(ids == EOS_ID)
    pieces = np.split(ids, ends + 1)[:-1]  # complete documents; the cut-off tail is dropped
    docs = list(iter_documents(cfg, split))
    assert len(pieces) >= len(docs) - 1
    assert [tok.decode(p[:-1].tolist()) for p in pieces] == docs[: len(pieces)]
    assert meta["splits"][split]["documents"] == len(docs)
    assert meta["splits"][split]["tokens"] == sum(len(tok.encode(d).ids) + 1 for d in docs)
    assert meta["splits"][split]["bytes"] == sum(len(d.encode("utf-8")) for d in docs)


def test_meta(prepared):
    cfg, meta = prepared
    assert meta["vocab_size"] == 300 and meta["seq_len"] == 32 and meta["eos_id"] == EOS_ID
    assert meta["config"] == asdict(cfg) and len(meta["fingerprint"]) == 16
    assert 0 < meta["xz_bpb_val"] < 8 and meta["xz_bytes"] == meta["splits"]["val"]["bytes"]
    assert json.loads((Path(cfg.dir) / "meta.json").read_text()) == meta


def test_prepare_is_idempotent_and_refuses_another_config(prepared, capsys):
    cfg, meta = prepared
    stamp = (Path(cfg.dir) / "meta.json").stat().st_mtime_ns
    assert prepare_data(cfg, progress=False) == meta
    assert ensure_data(cfg, progress=False) == meta
    assert ensure_data(replace(cfg, num_workers=2, shuffle=False), progress=False) == meta  # not data-defining
    assert (Path(cfg.dir) / "meta.json").stat().st_mtime_ns == stamp
    with pytest.raises(DataError, match=r"data.dir.*another data config.*delete"):
        prepare_data(replace(cfg, seq_len=16), progress=False)
    with pytest.raises(DataError, match="data.dir"):
        ensure_data(replace(cfg, vocab_size=512), progress=False)
    assert (Path(cfg.dir) / "meta.json").stat().st_mtime_ns == stamp
    assert [p.name for p in Path(cfg.dir).parent.iterdir()] == ["data"]  # no temporary folder left


def test_prepare_never_overwrites_other_folders(corpus, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    with pytest.raises(DataError, match="not a prepared dataset"):
        prepare_data(small_cfg(corpus, tmp_path / "mine"), progress=False)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "precious"
    with pytest.raises(DataError, match="data.sources"):  # a failed prepare leaves nothing behind
        prepare_data(small_cfg([str(tmp_path / "missing")], tmp_path / "new"), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_prepare_with_a_given_tokenizer(prepared, tmp_path):
    cfg, meta = prepared
    other = replace(cfg, dir=str(tmp_path / "d"), tokenizer=str(Path(cfg.dir) / "tokenizer.json"), max_docs=20)
    m = prepare_data(other, progress=False)
    assert m["vocab_size"] == 300 and m["fingerprint"] != meta["fingerprint"]
    assert (tmp_path / "d" / "tokenizer.json").read_bytes() == (Path(cfg.dir) / "tokenizer.json").read_bytes()


# ---------------------------------------------------------------- loader

RESUME_SCRIPT = """
import json, sys, torch
from jobspec.schema import DataConfig
from training.data.loader import TokenLoader
cfg, jobs, out = DataConfig(**json.loads(sys.argv[1])), json.loads(sys.argv[2]), sys.argv[3]
results = {}
for k, state in jobs:  # the first loader of this process is fresh; later ones share the process
    loader = TokenLoader(cfg, "train", 8, seed=7)
    loader.load_state_dict(state)
    it = iter(loader)
    results[k] = [next(it) for _ in range(5)]
torch.save(results, out)
"""


def test_loader_resumes_exactly_in_a_fresh_process(prepared, tmp_path):
    cfg, meta = prepared
    loader = TokenLoader(cfg, "train", 8, seed=7)
    per_epoch = len(loader)
    assert per_epoch == meta["splits"]["train"]["samples"] // 8 >= 4
    it = iter(loader)
    batches, states = [], []
    for _ in range(2 * per_epoch + 4):  # across two epoch boundaries
        batches.append(next(it))
        states.append(json.loads(json.dumps(loader.state_dict())))  # must survive JSON
    x, y = batches[0]
    assert x.shape == y.shape == (8, cfg.seq_len) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    epoch0 = torch.cat([b[0] for b in batches[:per_epoch]])
    epoch1 = torch.cat([b[0] for b in batches[per_epoch : 2 * per_epoch]])
    assert len({tuple(r) for r in epoch0.tolist()}) == len(epoch0)  # each sample once per epoch
    assert not torch.equal(epoch0, epoch1)  # reshuffled
    assert states[per_epoch - 1]["epoch"] == 0 and states[per_epoch]["epoch"] == 1 and loader.epoch == 2

    # The same loader, rewound in place after it has been iterated, replays too.
    loader.load_state_dict(states[2])
    assert loader.state_dict() == states[2]
    replay = iter(loader)
    assert all(torch.equal(next(replay)[0], batches[i][0]) for i in range(3, 6))

    # Resume after batch k in a new process: mid-epoch; just before, exactly at, and just after an epoch's end.
    env = dict(os.environ, PYTHONPATH=str(REPO), TMPDIR=str(tmp_path), OMP_NUM_THREADS="1")
    procs = []
    for ks in ((3, per_epoch), (per_epoch - 2, per_epoch + 1)):
        out = tmp_path / f"{ks[0]}.pt"
        jobs = json.dumps([(k, states[k - 1]) for k in ks])
        procs.append(
            (
                out,
                subprocess.Popen(
                    [sys.executable, "-c", RESUME_SCRIPT, json.dumps(asdict(cfg)), jobs, str(out)],
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                ),
            )
        )
    for out, proc in procs:
        output = proc.communicate(timeout=120)[0]
        assert proc.returncode == 0, output
        for k, resumed in torch.load(out).items():
            for i, (x, y) in enumerate(resumed):
                assert torch.equal(x, batches[k + i][0]) and torch.equal(y, batches[k + i][1]), (k, i)


OPEN_SCRIPT = """
import json, os, sys
from jobspec.schema import DataConfig
from training.data.loader import TokenLoader
cfg, pause_fd = DataConfig(**json.loads(sys.argv[1])), int(sys.argv[2])
if pause_fd >= 0:  # stop between streaming's look for a free shared-memory prefix and its creating it
    import streaming.base.shared.prefix as prefix
    look, last = prefix._check_and_find_retrying, prefix.SHM_TO_CLEAN[-1]
    def look_then_pause(local, remote, shm_name, retry):
        found = look(local, remote, shm_name, retry)
        if shm_name == last:
            print("found", found, flush=True)
            os.read(pause_fd, 1)  # until the test closes the pipe
        return found
    prefix._check_and_find_retrying = look_then_pause
loader = TokenLoader(cfg, "train", 8, seed=7)
print("first batch", next(iter(loader))[0].sum().item(), flush=True)
sys.stdin.read()  # the loader stays open (its shared memory with it) until the test closes stdin
"""


def _waits_on_a_file_lock(pid: int) -> bool:
    return any(
        line.split()[1] == "->" and line.split()[5] == str(pid) for line in Path("/proc/locks").read_text().splitlines()
    )


def test_two_jobs_opening_their_data_at_once_on_one_machine_both_start(prepared, tmp_path):
    """Streaming names a dataset's shared memory by the first free prefix: it looks, then creates. Job A is
    stopped between the two; job B opens its data meanwhile. Without the machine-wide turn B takes the same
    prefix and A then dies of FileExistsError; with it, B waits for A's turn to end."""
    cfg, _ = prepared
    env = dict(os.environ, PYTHONPATH=str(REPO), TMPDIR=str(tmp_path), OMP_NUM_THREADS="1")
    pause_read, pause_write = os.pipe()

    def job(pause_fd: int) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-c", OPEN_SCRIPT, json.dumps(asdict(cfg)), str(pause_fd)],
            env=env,
            pass_fds=(pause_read,),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    a = job(pause_read)
    assert a.stdout.readline().startswith("found"), a.communicate(timeout=60)[0]
    b = job(-1)
    # B either opens its data while A is stopped (no turn), or queues for the turn that A holds.
    while not select.select([b.stdout], [], [], 0.1)[0] and not _waits_on_a_file_lock(b.pid):
        assert b.poll() is None, b.communicate()[0]
    os.close(pause_write)  # A goes on
    out_a = a.communicate("", timeout=300)[0]
    out_b = b.communicate("", timeout=300)[0]
    assert a.returncode == 0 and b.returncode == 0, out_a + "\n" + out_b
    assert out_a.split()[-1] == out_b.split()[-1]  # the same first batch in each


BOTH_SPLITS_SCRIPT = """
import json, sys
from jobspec.schema import DataConfig
from training.data.loader import TokenLoader, iter_val_batches
cfg = DataConfig(**json.loads(sys.argv[1]))
next(iter(TokenLoader(cfg, "train", 8, seed=7)))
next(iter_val_batches(cfg, 4))  # the val split is opened later, as validation does
print("opened", flush=True)
sys.stdin.read()
"""


def _blocks_naming(folder: Path) -> set[str]:
    from training.data.loader import _names

    return {b.name[:6] for b in Path("/dev/shm").glob("[0-9]" * 6 + "_locals") if _names(b, str(folder.resolve()))}


def test_a_loader_removes_what_killed_loaders_of_each_split_left(prepared, tmp_path):
    """A process killed with SIGKILL (its resource tracker too, as srun does) leaves its shared memory behind;
    the next process to open each split, the later-opened val split included, removes it."""
    cfg, _ = prepared
    env = dict(os.environ, PYTHONPATH=str(REPO), TMPDIR=str(tmp_path), OMP_NUM_THREADS="1")

    def job() -> subprocess.Popen:
        proc = subprocess.Popen(
            [sys.executable, "-c", BOTH_SPLITS_SCRIPT, json.dumps(asdict(cfg))],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        assert proc.stdout.readline().startswith("opened"), proc.communicate(timeout=60)[0]
        return proc

    splits = Path(cfg.dir) / "train", Path(cfg.dir) / "val"
    live = [_blocks_naming(split) for split in splits]  # this test process's own loaders (earlier tests)
    killed = job()
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    left = [_blocks_naming(split) - mine for split, mine in zip(splits, live)]
    assert all(left), "the killed loader left no memory of a split: nothing to test"
    again = job()
    try:
        for split, stale in zip(splits, left):
            assert not _blocks_naming(split) & stale, split
    finally:
        again.communicate("", timeout=60)


def test_val_batches_cover_the_split_in_order(prepared):
    cfg, meta = prepared
    first = list(iter_val_batches(cfg, 4))
    again = list(iter_val_batches(cfg, 4))
    assert len(first) == len(again) and all(torch.equal(a[0], b[0]) for a, b in zip(first, again))
    rows = torch.cat([torch.cat([x, y[:, -1:]], 1) for x, y in first])
    samples = read_samples(Path(cfg.dir) / "val")
    assert torch.equal(rows, torch.from_numpy(np.stack(samples).astype(np.int64)))


def test_remote_data_with_a_local_cache(prepared, tmp_path):
    cfg, meta = prepared
    remote = replace(cfg, remote=cfg.dir, dir=str(tmp_path / "cache"))
    assert ensure_data(remote, progress=False) == meta
    assert (tmp_path / "cache" / "tokenizer.json").is_file()
    x, _ = next(iter(TokenLoader(remote, "train", 8, seed=7)))
    assert torch.equal(x, next(iter(TokenLoader(cfg, "train", 8, seed=7)))[0])
    with pytest.raises(DataError, match="data.remote"):
        ensure_data(replace(remote, remote=str(tmp_path / "nowhere")), progress=False)
