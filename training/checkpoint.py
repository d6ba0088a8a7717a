"""Sharded, atomic, reshardable checkpoints in safetensors and JSON. Nothing here unpickles.

    checkpoints/step_00000100/      (jobspec/contract.py names them; nothing else is ever taken for one)
        model/       shard-0000R-model-00001-of-00001.safetensors per writing rank (DCP offsets inside)
        optim/       the same for AdamW's moments
        trainer_state.json   step, tokens seen, data-loader position, config hash
        rng/rank_R.json      each rank's RNG states
        manifest.json        every file's size and xxh64; written last

A checkpoint is written into `.tmp-step_...` and renamed into place once complete, so a
crash mid-save leaves the previous checkpoint as the newest. A committed checkpoint is never
removed before a newer one is committed, and a step already saved is never written again.
On resume, a checkpoint whose manifest is missing or whose files don't match it is skipped
with a warning naming the file, and set aside as `step_N.corrupt` so that no later save or
prune takes it for a good one. Pruning counts and deletes only checkpoints with our names whose
hashes this process has checked (it wrote them, resumed from them, or hashed them before pruning),
never the one just written; it renames a checkpoint to `.trash-step_N` before removing its files,
so that a kill mid-removal never leaves a half-deleted `step_N`.
"""

from __future__ import annotations

import base64
import errno
import json
import os
import random
import shutil
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import xxhash
from torch.distributed.checkpoint import HuggingFaceStorageReader
from torch.distributed.checkpoint.api import CheckpointException as DCPException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from jobspec import atomic
from jobspec.contract import CHECKPOINTS, RunFolder, checkpoint_name, checkpoint_step
from jobspec.faults import fault
from training.safetensors_reader import StreamingHFStorageReader
from training.safetensors_writer import StreamingHFStorageWriter

MANIFEST = "manifest.json"
# DCP warns that it falls back to one process when no process group exists: that is intended here.
warnings.filterwarnings("ignore", message="torch.distributed is disabled")


class CheckpointError(RuntimeError):
    pass


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def step_dirs(root: Path) -> list[Path]:
    """Folders named as our checkpoints (step_NNNNNNNN), newest first. A user's `step_00000100.bak` is not one."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and checkpoint_step(p.name) is not None]
    return sorted(found, key=lambda p: checkpoint_step(p.name), reverse=True)


def clean_unfinished(run_dir: str | Path) -> list[Path]:
    """Remove `.tmp-step_*` folders (saves that a crash interrupted) and `.trash-step_*` ones (prunes that a crash
    interrupted). Only the trainer holding the run folder's lock calls this (no other save can be under way)."""
    root = checkpoint_root(run_dir)
    stale = sorted([*root.glob(".tmp-step_*"), *root.glob(".trash-step_*")]) if root.is_dir() else []
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def set_aside(path: Path, why: str) -> Path:
    """Rename a damaged checkpoint `step_N` to `step_N.corrupt` (or .corrupt-2, ...) beside a note saying why:
    kept for a person to look at, never again taken for a checkpoint."""
    for n in range(1, 1000):
        dest = path.with_name(f"{path.name}.corrupt" + (f"-{n}" if n > 1 else ""))
        if not dest.exists():
            os.replace(path, dest)
            _verified.discard(path.resolve())
            (dest / "WHY_SET_ASIDE.txt").write_text(why + "\n")
            return dest
    raise CheckpointError(f"can't set {path} aside: too many {path.name}.corrupt-* folders")


def _file_hash(path: Path) -> str:
    h, buffer = xxhash.xxh64(), bytearray(8 << 20)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            h.update(view[:n])
    return h.hexdigest()


HASH_THREADS = 4


def _file_hashes(paths: list[Path]) -> list[str]:
    """xxh64 of each file, several files at once: xxhash releases the GIL, so hashing a 1 GB
    checkpoint's four files takes half the time on two cores (bench/checkpoint_io.py)."""
    if len(paths) <= 1:
        return [_file_hash(p) for p in paths]
    with ThreadPoolExecutor(min(HASH_THREADS, len(paths))) as pool:
        return list(pool.map(_file_hash, paths))


def _files(folder: Path) -> list[str]:
    return sorted(
        str(p.relative_to(folder))
        for p in folder.rglob("*")
        if p.is_file() and p.name != MANIFEST and not p.name.startswith(".manifest-part")
    )


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_json(path, obj, durable=True)


def _world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier(group=None) -> None:
    if dist.is_initialized():
        dist.barrier(group=group)


# ---------------------------------------------------------------- RNG states as JSON


def rng_state() -> dict:
    def b64(t: torch.Tensor) -> str:
        return base64.b64encode(t.numpy().tobytes()).decode()

    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "torch": b64(torch.get_rng_state()),
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = b64(torch.cuda.get_rng_state())
    return state


def seed_globals(seed: int, rank: int) -> None:
    """Python's, NumPy's and torch's global generators from the job's seed and this rank, so that a run's RNG
    states are a function of its config and step (checkpoints restore them; a resumed run continues them)."""
    mixed = (seed * 1_000_003 + rank) % 2**32
    random.seed(mixed)
    np.random.seed(mixed)
    torch.manual_seed(mixed)


def set_rng_state(state: dict) -> None:
    def tensor(s: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)

    torch.set_rng_state(tensor(state["torch"]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensor(state["cuda"]))


# ---------------------------------------------------------------- save


def _model_tensors(model, whole: bool = False) -> dict:
    """The model's state dict, with a tied output head left out: it is the embedding matrix,
    and safetensors refuses two names for one storage. Tying restores it on load.
    A model with `checkpoint_keys` (LoRA: what it trains) saves and resumes only those, unless whole."""
    state = get_model_state_dict(model)
    if getattr(getattr(model, "cfg", None), "tie_embeddings", False):
        state.pop("output.weight", None)
    keys = getattr(model, "checkpoint_keys", None)
    if keys is not None and not whole:
        state = {k: v for k, v in state.items() if k in keys}
    return state


def _optim_tensors(model, optimizer) -> dict:
    """AdamW's per-parameter state only; param_groups (lr, betas) come from the config on load."""
    return {"state": get_optimizer_state_dict(model, optimizer)["state"]}


# Each rank writes its share of a state as up to this many safetensors files, one thread each, so that
# copying into the page cache, fsync and hashing overlap (bench/checkpoint_io.py).
WRITE_FILES = 4


def _writer(folder: Path, state: dict, distributed: bool) -> StreamingHFStorageWriter:
    """A storage writer that spreads the tensors over files of about equal size. The file of each
    tensor is decided from global shapes alone, so every rank computes the same mapping."""
    flat = {}

    def walk(obj, prefix):  # DCP names nested entries by their dotted path
        for key, value in obj.items():
            name = f"{prefix}{key}"
            if isinstance(value, dict):
                walk(value, name + ".")
            else:
                flat[name] = value.numel() * value.element_size() if isinstance(value, torch.Tensor) else 0

    walk(state, "")
    files = max(1, min(WRITE_FILES, len(flat)))
    load, mapping = [0] * files, {}
    for name, size in sorted(flat.items(), key=lambda kv: (-kv[1], kv[0])):
        i = load.index(min(load))  # the lightest file so far
        mapping[name] = i + 1
        load[i] += size
    return StreamingHFStorageWriter(
        str(folder), fqn_to_index_mapping=mapping, thread_count=files, save_distributed=distributed
    )


def save_checkpoint(
    run_dir: str | Path, step: int, model, optimizer, trainer_state: dict, keep_last: int = 2, keep_every: int = 0
) -> Path:
    """Collective: every rank calls it. Returns the committed folder."""
    return write_checkpoint(
        run_dir,
        step,
        _model_tensors(model),
        _optim_tensors(model, optimizer),
        rng_state(),
        trainer_state,
        keep_last,
        keep_every,
    )


def write_checkpoint(
    run_dir: str | Path,
    step: int,
    model_state: dict,
    optim_state: dict,
    rng: dict,
    trainer_state: dict,
    keep_last: int = 2,
    keep_every: int = 0,
    group=None,
) -> Path:
    """Write already-gathered state into `.tmp-step_N`, hash it into a manifest, rename into place.

    Collective over `group` (default: the world). The async saver calls it from a background thread
    with a process group of its own, so its collectives never interleave with training's.
    """
    started = time.monotonic()
    rank, world = _world()
    root = checkpoint_root(run_dir)
    final = root / checkpoint_name(step)
    tmp = root / f".tmp-{checkpoint_name(step)}"
    if _already_saved(final, group):  # e.g. a stop signal on a checkpoint step: the step is saved already
        return final
    if rank == 0:
        if tmp.exists():  # a previous attempt at this very step died mid-save
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    _barrier(group)
    try:
        distributed = world > 1
        dcp.save(model_state, process_group=group, storage_writer=_writer(tmp / "model", model_state, distributed))
        dcp.save(optim_state, process_group=group, storage_writer=_writer(tmp / "optim", optim_state, distributed))
        _write_json(tmp / "rng" / f"rank_{rank}.json", rng)
        if rank == 0:
            _write_json(tmp / "trainer_state.json", trainer_state)
        _barrier(group)
        # Every rank hashes a share of the files; rank 0 merges the shares into the manifest.
        files = _files(tmp)
        mine = files[rank::world]
        part = {
            f: {"bytes": (tmp / f).stat().st_size, "xxh64": digest}
            for f, digest in zip(mine, _file_hashes([tmp / f for f in mine]))
        }
        _write_json(tmp / f".manifest-part-{rank}.json", part)
        _barrier(group)
        if rank == 0:
            fault("checkpoint.manifest")
            manifest = {}
            for r in range(world):
                part_path = tmp / f".manifest-part-{r}.json"
                manifest.update(json.loads(part_path.read_text()))
                part_path.unlink()
            _write_json(tmp / MANIFEST, {"step": step, "files": manifest})
            fault("checkpoint.commit")
            if final.exists():  # damaged (it failed the check above): kept aside, never deleted before this commits
                set_aside(final, f"found damaged when step {step} was saved again: {verify_quickly(final)}")
            os.replace(tmp, final)
            _fsync_dir(root)
            _verified.add(final.resolve())  # every file was hashed into the manifest just above
            fault("checkpoint.prune")
            prune(root, keep_last, keep_every, keep=final)
            _record_save_time(run_dir, time.monotonic() - started)
    except (Exception, DCPException) as e:  # DCPException derives from BaseException
        if rank == 0:  # an unfinished save is garbage, and on a full disk it holds the space we need
            shutil.rmtree(tmp, ignore_errors=True)
        if _disk_full(e):
            raise CheckpointError(
                f"the disk holding {root} is full: checkpoint step {step} could not be written. "
                "Earlier checkpoints are untouched; free space (or lower checkpoint.keep_last) "
                "and resume."
            ) from None
        raise
    _barrier(group)
    return final


_longest_save: dict[Path, float] = {}  # run folder -> this process's slowest save into it, in seconds


def _record_save_time(run_dir: str | Path, seconds: float) -> None:
    """Rank 0 keeps the longest save of this trainer in logs/save_seconds.txt: the executors give the trainer that
    long (twice, see jobspec.contract.stop_grace_s) between a stop signal and SIGKILL. A failed write costs only
    that, never the checkpoint."""
    folder = RunFolder(Path(run_dir).resolve())
    longest = _longest_save[folder.path] = max(_longest_save.get(folder.path, 0.0), seconds)
    path = folder.save_seconds
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(f"{longest:.3f}\n")
        os.replace(tmp, path)
    except OSError:
        pass


def _disk_full(e: BaseException) -> bool:
    """ENOSPC anywhere in the error: DCP wraps each rank's OSError in a CheckpointException."""
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return True
    nested = [f[0] if isinstance(f, tuple) else f for f in getattr(e, "failures", {}).values()]
    nested += [x for x in (e.__cause__, e.__context__) if x is not None]
    return any(isinstance(x, BaseException) and _disk_full(x) for x in nested) or "No space left on device" in str(e)


def _already_saved(final: Path, group) -> bool:
    """True (on every rank) when this step's checkpoint is committed and complete: saving it again would only
    put the good copy at risk."""
    rank, world = _world()
    done = torch.tensor([1 if final.is_dir() and verify_quickly(final) is None else 0])
    if world > 1:
        dist.broadcast(done, src=0, group=group)  # rank 0 decides: every rank must take the same branch
    return bool(done.item())


def verify_quickly(path: Path) -> Optional[str]:
    """None if the checkpoint's manifest is there and every file has the size it records (no hashing: for
    decisions made at every save); else what is wrong."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError) as e:
        return f"{path / MANIFEST} is missing or unreadable ({e.__class__.__name__})"
    for name, expected in manifest.items():
        f = path / name
        if not f.is_file() or f.stat().st_size != expected["bytes"]:
            return f"{f} is missing or not {expected['bytes']} bytes"
    return None


# The checkpoints this process knows to be good, by hash: written by it, resumed from, or checked by prune. A size
# check can't see a flipped bit, and pruning must never count a damaged checkpoint among the ones it keeps.
_verified: set[Path] = set()


def _known_good(path: Path) -> bool:
    """Whether a checkpoint's hashes match its manifest, hashing it only the first time this process asks."""
    key = path.resolve()
    if key not in _verified and verify(path) is None:
        _verified.add(key)
    return key in _verified


def prune(root: Path, keep_last: int, keep_every: int, keep: Optional[Path] = None) -> list[Path]:
    """Delete good checkpoints beyond the newest `keep_last` good ones, except every `keep_every`-th step and
    `keep` (the one just written). Good means hash-verified by this process (see _verified; an older one is hashed
    here once): incomplete or damaged folders neither count nor get deleted, so a damaged newer one never pushes a
    good one out. Returns what was deleted."""
    if keep_last < 1:
        raise CheckpointError(f"checkpoint.keep_last={keep_last}: at least 1 checkpoint must be kept")
    kept, deleted = 0, []
    for path in step_dirs(root):  # newest first
        step = checkpoint_step(path.name)
        milestone = bool(keep_every) and step % keep_every == 0
        if milestone and kept >= keep_last:
            continue  # kept whatever it holds: no need to hash it
        if path != keep and not _known_good(path):
            continue
        if kept < keep_last or milestone or path == keep:
            kept += 1
            continue
        remove_checkpoint(path)
        deleted.append(path)
    return deleted


def remove_checkpoint(path: Path) -> None:
    """Rename `step_N` to `.trash-step_N`, then delete its files: a kill in between leaves a folder that is no
    checkpoint (the lock holder's clean_unfinished removes it), never a half-deleted `step_N`."""
    trash = path.with_name(f".trash-{path.name}")
    if trash.exists():  # an earlier prune of this very step was killed mid-removal
        shutil.rmtree(trash)
    os.replace(path, trash)
    _fsync_dir(path.parent)
    _verified.discard(path.resolve())
    for folder, _, files in os.walk(trash, topdown=False):
        for name in files:
            os.unlink(os.path.join(folder, name))
            fault("checkpoint.trash_remove")
        os.rmdir(folder)


# ---------------------------------------------------------------- validate and load


def verify(path: Path, files: Optional[list[str]] = None) -> Optional[str]:
    """None if the checkpoint matches its manifest, else a sentence naming what's wrong."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        return f"{manifest_path} is missing (the save never finished)"
    try:
        manifest = json.loads(manifest_path.read_text())["files"]
    except (ValueError, KeyError) as e:
        return f"{manifest_path} is unreadable ({e})"
    names = files if files is not None else sorted(manifest)
    for name in names:
        f, expected = path / name, manifest[name]
        if not f.is_file():
            return f"{f} is missing"
        size = f.stat().st_size
        if size != expected["bytes"]:
            return f"{f} has {size} bytes, its manifest says {expected['bytes']} (truncated?)"
    for name, digest in zip(names, _file_hashes([path / n for n in names])):
        if digest != manifest[name]["xxh64"]:
            return f"{path / name} fails its checksum (corrupted)"
    return None


def _verify_collectively(path: Path) -> Optional[str]:
    """Each rank checks a share of the files; any failure anywhere fails the checkpoint everywhere."""
    rank, world = _world()
    problem = None
    manifest_path = path / MANIFEST
    try:
        names = sorted(json.loads(manifest_path.read_text())["files"])
    except (OSError, ValueError, KeyError):
        names = None
    problem = verify(path, None if names is None else names[rank::world])
    if world > 1:
        flag = torch.tensor([0 if problem is None else 1])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and problem is None:
            problem = "another rank found a damaged file (see its warning)"
    return problem


def find_resumable(run_dir: str | Path, set_damaged_aside: bool = False) -> Optional[Path]:
    """The newest checkpoint that passes verification, warning about each one skipped.

    Raises CheckpointError if checkpoints exist but none is valid: better to stop than to
    silently start from scratch over a run's history. Nothing is deleted. The trainer resuming
    its own run (set_damaged_aside=True) renames each damaged newer one to step_N.corrupt.
    """
    candidates = step_dirs(checkpoint_root(run_dir))
    rank, _ = _world()
    skipped = []
    for path in candidates:
        problem = _verify_collectively(path)
        if problem is None:
            _verified.add(path.resolve())
            if set_damaged_aside and rank == 0:  # a newer damaged folder must not meet this step's saves later
                for damaged, why in skipped:
                    set_aside(damaged, f"skipped on resume from {path.name}: {why}")
            _barrier()
            return path
        skipped.append((path, problem))
        if rank == 0:
            warnings.warn(f"skipping checkpoint {path.name}: {problem}; trying the previous one", stacklevel=2)
    damaged = sorted(checkpoint_root(run_dir).glob("step_*.corrupt*")) if set_damaged_aside else []
    if candidates or damaged:
        raise CheckpointError(
            f"{checkpoint_root(run_dir)} holds {len(candidates) + len(damaged)} checkpoint(s) and "
            "none is valid (see the warnings above; damaged ones are kept as step_N.corrupt). "
            "Nothing was deleted; restore the files or start a new run."
        )
    return None


def _dcp_load(state: dict, folder: Path) -> None:
    """dcp.load, with its failures (a BaseException naming no file) turned into a sentence."""
    try:
        dcp.load(state, storage_reader=StreamingHFStorageReader(str(folder)))
    except DCPException as e:
        first = next(iter(e.failures.values()), None)
        cause = first[0] if isinstance(first, tuple) else first
        raise CheckpointError(
            f"could not load {folder} into this model: {cause!r}. Does the job's model: section "
            "(n_layer, d_model, n_head, n_kv_head, vocab_size) match the checkpoint's config.yaml?"
        ) from None


def load_checkpoint(path: Path, model, optimizer=None, whole: bool = False) -> dict:
    """Load weights (and optimizer moments) into an already-parallelized model, on any mesh.
    whole: every tensor of the model (a base checkpoint into a LoRA model), not only its checkpoint_keys."""
    rank, _ = _world()
    model_sd = _model_tensors(model, whole)
    fresh = [k for k in getattr(model, "fresh_keys", ()) if k in model_sd]
    if fresh:  # parameters a task adds to a pretrained model (a reward head) keep their init if the source lacks them
        stored = HuggingFaceStorageReader(str(path / "model")).read_metadata().state_dict_metadata
        for key in fresh:
            if key not in stored:
                model_sd.pop(key)
    _dcp_load(model_sd, path / "model")
    set_model_state_dict(model, model_sd, options=StateDictOptions(strict=False))
    if optimizer is not None and (path / "optim").is_dir():
        optim_sd = get_optimizer_state_dict(model, optimizer)
        state = {"state": optim_sd["state"]}
        _dcp_load(state, path / "optim")
        set_optimizer_state_dict(
            model,
            optimizer,
            {"state": state["state"], "param_groups": optim_sd["param_groups"]},
            options=StateDictOptions(strict=True),
        )
    rng_file = path / "rng" / f"rank_{rank}.json"
    if rng_file.is_file():  # a new world size has new ranks without a saved state: they keep their seed
        set_rng_state(json.loads(rng_file.read_text()))
    trainer_state = path / "trainer_state.json"
    return json.loads(trainer_state.read_text()) if trainer_state.is_file() else {}
