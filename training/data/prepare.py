"""Tokenize the corpus once into MosaicML streaming (MDS) shards that any number of ranks can read.

    <data.dir>/tokenizer.json
    <data.dir>/train/   index.json + shard.*.mds, one sample = {"tokens": seq_len + 1 token ids}
    <data.dir>/val/
    <data.dir>/meta.json  counts, the data config and its fingerprint, the xz baseline

Documents are encoded, each followed by <|endoftext|>, concatenated and cut into consecutive
windows of seq_len + 1 tokens (the tail is dropped): inputs = tokens[:-1], targets = tokens[1:].
"""

from __future__ import annotations

import itertools
import json
import lzma
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from jobspec.faults import fault

# The fingerprint is known at submit too (data.dir's default folder): its one home is jobspec/prepared_data.py
from jobspec.prepared_data import FINGERPRINT_KEYS, FORMAT_VERSION, config_dict, fingerprint
from training.data import DataError
from training.data.corpus import SPLITS, iter_documents, source_files
from training.data.special_tokens import FILES as FOLDER_FILES
from training.data.special_tokens import write_tokenizer_files
from training.data.tokenizer import eos_id, load_tokenizer, token_byte_lengths, train_tokenizer

TOKENIZER_TRAIN_BYTES = 64 << 20  # BPE is trained on the first 64 MiB of the train split at most
XZ_MAX_BYTES = 16 << 20  # the xz baseline is measured on the first 16 MiB of the val split at most
BATCH_BYTES = 1 << 20  # documents per encode_batch call: ~1 MiB of text, split over all cores


def read_meta(cfg) -> dict | None:
    """meta.json of cfg.dir if it was made from this config; None if there is none; else DataError."""
    path = Path(cfg.dir) / "meta.json"
    if not path.is_file():
        return None
    meta = json.loads(path.read_text())
    if meta.get("fingerprint") != fingerprint(cfg):
        key, value = ("data.remote", cfg.remote) if cfg.remote else ("data.dir", str(cfg.dir))
        made_from = {k: meta.get("config", {}).get(k) for k in FINGERPRINT_KEYS}
        raise DataError(
            f"key '{key}' has the value {value!r}, but that folder holds data made from another data config "
            f"({json.dumps(made_from)}; fingerprint {meta.get('fingerprint')}, this config's is "
            f"{fingerprint(cfg)}). Pick another {key}, or delete that folder to prepare it again."
        )
    return meta


def ensure_data(cfg, progress: bool = True) -> dict:
    """The dataset's meta, preparing it first if needed. Every rank of a job calls it: the first to take the
    folder's lock prepares, the others wait on the lock, outside any collective (a barrier would fail them after
    parallel.collective_timeout_s, and a big corpus takes longer), then find it prepared.

    With data.remote set, data.dir is only a local cache of the remote: the data must have been
    prepared and uploaded already; this fetches its meta.json and tokenizer.json into data.dir.
    """
    fault("data.prepare")
    if not cfg.remote:
        meta = read_meta(cfg)
        if meta is not None:
            return meta
    with preparation_lock(Path(cfg.dir), progress):
        if cfg.remote:
            return _fetch_remote(cfg)
        meta = read_meta(cfg)  # prepared by another process while this one waited
        return meta if meta is not None else prepare_data(cfg, progress=progress)


@contextmanager
def preparation_lock(data_dir: Path, progress: bool = True):
    """Hold data_dir's preparation lock (flock on a sibling file: data_dir itself appears only when complete)."""
    import fcntl

    data_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(data_dir.parent / f".{data_dir.name}.lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if progress:
                print(f"data: waiting for another process to prepare {data_dir}", flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def prepare_data(cfg, *, progress: bool = True) -> dict:
    """Write tokenizer.json, train/, val/ and meta.json into cfg.dir; returns the meta.

    Idempotent (a folder made from the same config is kept as is) and atomic: everything is
    written into a temporary sibling folder that is renamed into place at the very end.
    """
    out = Path(cfg.dir)
    meta = read_meta(cfg)
    if meta is not None:
        print(f"data: {out} is already prepared from this config; kept as is")
        return meta
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(
            f"key 'data.dir' has the value {str(cfg.dir)!r}, but that path exists and is not a "
            f"prepared dataset (no meta.json). Pick another data.dir, or delete it."
        )
    for src in cfg.sources:  # a typo in a path fails now, not after training the tokenizer
        if src != "demo":
            source_files(src)
    start = time.time()
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"  # same filesystem, so the rename is atomic
    shutil.rmtree(tmp, ignore_errors=True)  # ours: left by an earlier crash of a process with this pid
    tmp.mkdir(parents=True)
    try:
        tok = _get_tokenizer(cfg, tmp / "tokenizer.json", progress)
        splits, xz = {}, {}
        for split in SPLITS:
            splits[split], xz[split] = _write_split(cfg, tok, split, tmp / split, progress)
        meta = {
            "format": FORMAT_VERSION,
            "fingerprint": fingerprint(cfg),
            "vocab_size": tok.get_vocab_size(),
            "seq_len": cfg.seq_len,
            "eos_id": eos_id(tok),
            "splits": splits,
            "xz_bpb_val": xz["val"][0],  # bits per byte of `xz -9e` on the raw val text: the bar to beat
            "xz_bytes": xz["val"][1],
            "config": config_dict(cfg),
            "seconds": round(time.time() - start, 1),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        try:
            os.replace(tmp, out)  # also replaces an empty folder
        except OSError:
            # Another process (another rank, another job) published first: keep theirs if it matches.
            meta = read_meta(cfg)
            if meta is None:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    tr, va = meta["splits"]["train"], meta["splits"]["val"]
    xz_note = f"xz -9e on val: {meta['xz_bpb_val']:.3f} bits/byte" if meta["xz_bpb_val"] else "no val split"
    print(
        f"data: {tr['tokens']:,} train + {va['tokens']:,} val tokens -> {tr['samples']:,} + {va['samples']:,} "
        f"samples of {cfg.seq_len + 1} tokens in {tr['shards'] + va['shards']} shards at {out} "
        f"({meta['seconds']:.0f}s; {xz_note})"
    )
    return meta


def _get_tokenizer(cfg, dest: Path, progress: bool):
    if cfg.tokenizer:
        tok = load_tokenizer(cfg.tokenizer)
        eos_id(tok), token_byte_lengths(tok)  # fail now, not after tokenizing, if it can't be used
        shutil.copyfile(cfg.tokenizer, dest)
        for name in FOLDER_FILES:  # its special tokens and chat template travel with it
            if (Path(cfg.tokenizer).parent / name).is_file():
                shutil.copyfile(Path(cfg.tokenizer).parent / name, dest.parent / name)
        return tok
    if progress:
        print(f"data: training a {cfg.vocab_size}-token byte-level BPE on the train split")
    tok = train_tokenizer(_first_bytes(iter_documents(cfg, "train"), TOKENIZER_TRAIN_BYTES), cfg.vocab_size)
    tok.save(str(dest))
    write_tokenizer_files(tok, dest.parent)
    return tok


def _write_split(cfg, tok, split: str, dest: Path, progress: bool) -> tuple[dict, tuple]:
    """Encode, pack and write one split; returns its counts and (xz bits per byte, bytes measured)."""
    from streaming import MDSWriter  # slow import (pulls in torchvision): only when writing

    vocab = tok.get_vocab_size()
    dtype = np.uint16 if vocab <= 1 << 16 else np.uint32  # ids < vocab: uint16 holds up to 65536
    window = cfg.seq_len + 1
    eos = eos_id(tok)
    xz, xz_in, xz_out = lzma.LZMACompressor(preset=9 | lzma.PRESET_EXTREME), 0, 0
    docs = nbytes = ntokens = samples = 0
    carry = np.empty(0, dtype)  # tokens waiting for the next window
    # Parallel over documents, in Rust. The _fast variant (tokenizers >= 0.21) skips the
    # character offsets we don't need: twice as fast.
    encode_batch = getattr(tok, "encode_batch_fast", tok.encode_batch)
    with (
        _progress_bar(progress, f"tokenizing {split}") as update,
        MDSWriter(out=str(dest), columns={"tokens": f"ndarray:{dtype.__name__}"}) as writer,
    ):
        for batch in _batches(iter_documents(cfg, split), BATCH_BYTES):
            raw = [doc.encode("utf-8") for doc in batch]
            encoded = encode_batch(batch, add_special_tokens=False)
            ids = np.fromiter(itertools.chain.from_iterable(e.ids + [eos] for e in encoded), dtype)
            carry = np.concatenate([carry, ids])
            n = len(carry) // window
            for row in carry[: n * window].reshape(n, window):
                writer.write({"tokens": row})
            carry = carry[n * window :]
            docs, samples, ntokens = docs + len(batch), samples + n, ntokens + len(ids)
            nbytes += sum(map(len, raw))
            if split == "val" and xz_in < XZ_MAX_BYTES:
                chunk = b"".join(raw)[: XZ_MAX_BYTES - xz_in]
                xz_out += len(xz.compress(chunk))
                xz_in += len(chunk)
            update(docs, nbytes)
    if samples == 0 and not (split == "val" and docs == 0 and cfg.val_fraction == 0):
        raise DataError(
            f"the {split} split has {ntokens:,} tokens, not enough for one sequence of "
            f"data.seq_len + 1 = {window} tokens: add data, lower data.seq_len"
            + (" or raise data.val_fraction" if split == "val" else "")
        )
    xz_out += len(xz.flush())
    shards = len(list(dest.glob("shard.*.mds")))
    counts = {"documents": docs, "bytes": nbytes, "tokens": ntokens, "samples": samples, "shards": shards}
    return counts, ((8 * xz_out / xz_in if xz_in else None), xz_in)


def _fetch_remote(cfg) -> dict:
    """Copy meta.json and tokenizer.json from data.remote into data.dir; check the fingerprint."""
    from streaming.base.storage import CloudDownloader

    local = Path(cfg.dir)
    local.mkdir(parents=True, exist_ok=True)
    for name in ("meta.json", "tokenizer.json"):
        part = local / f".{name}.part-{os.getpid()}"
        part.unlink(missing_ok=True)
        try:
            CloudDownloader.direct_download(f"{cfg.remote.rstrip('/')}/{name}", str(part))
        except Exception as e:  # each cloud raises its own "not found"
            raise DataError(
                f"key 'data.remote' has the value {cfg.remote!r}, but its {name} can't be read "
                f"({type(e).__name__}: {e}). Prepare the data with `orch data prepare` into a "
                f"folder and upload that folder there."
            ) from None
        os.replace(part, local / name)  # refreshed every time: the remote may have been re-prepared
    return read_meta(cfg)


def _first_bytes(docs, limit: int):
    """Documents until `limit` UTF-8 bytes have been seen: a deterministic prefix."""
    seen = 0
    for doc in docs:
        if seen >= limit:
            return
        seen += len(doc.encode("utf-8"))
        yield doc


def _batches(docs, batch_bytes: int):
    batch, size = [], 0
    for doc in docs:
        batch.append(doc)
        size += len(doc)
        if size >= batch_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


@contextmanager
def _progress_bar(enabled: bool, description: str):
    """Yields update(docs, nbytes): a rich progress line (documents, bytes, speed), or nothing."""
    if not enabled:
        yield lambda docs, nbytes: None
        return
    from rich.progress import (
        FileSizeColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
        TransferSpeedColumn,
    )

    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TextColumn("{task.fields[docs]:,} docs"),
        FileSizeColumn(),
        TransferSpeedColumn(),
        TimeElapsedColumn(),
    ) as bar:
        task = bar.add_task(description, total=None, docs=0)
        yield lambda docs, nbytes: bar.update(task, completed=nbytes, docs=docs)
