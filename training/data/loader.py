"""(inputs, targets) batches over the MDS shards, resumable mid-epoch, split over ranks.

Ranks: mosaicml-streaming reads RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE from the
environment (torchrun sets them; training/distributed.py maps Slurm's onto them). Without them a
process is rank 0 of 1. Each data-parallel rank gets its own share of every epoch; with
`replication=k`, k consecutive ranks (a tensor-parallel group) get the same samples.

Streaming keeps its bookkeeping (epoch counter, resume point, sample order) in shared memory
named by a small integer prefix, shared by the ranks of a node. Consequences:
  * every rank must build its loaders in the same order: setup synchronises ranks;
  * a dataset's shared memory lives until its process exits, so build each loader once per
    process (iter_val_batches caches its own) rather than once per use;
  * load_state_dict() takes effect at the next iter(): drop iterators made before it.

Workers (data.num_workers) ignore the stop signals: torchrun and Slurm signal a trainer's whole process group,
and a worker killed by them would crash the trainer before it saves. The trainer stops them itself.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from training.data import DataError
from training.signals import STOP_SIGNALS

# Streaming warns at every epoch start that state dicts must account for replication: ours do
# (StreamingDataLoader.state_dict divides by it), so the warning is noise in every log.
logging.getLogger("streaming.base.dataset").addFilter(lambda record: "`replication` arg" not in record.getMessage())


class TokenLoader:
    """Endless (inputs, targets) int64 batches of shape [batch_size, seq_len] from one split.

    Epoch after epoch, reshuffled each epoch (seeded) when cfg.shuffle. state_dict() says where
    it stands; a new loader given it with load_state_dict() yields exactly the batches this one
    would have yielded next, in any process.
    """

    def __init__(self, cfg, split: str, batch_size: int, *, seed: int = 0, replication: int = 1):
        from streaming import StreamingDataLoader

        self.split, self.batch_size = split, batch_size
        self.dataset = _open_split(
            cfg, split, batch_size, shuffle=cfg.shuffle and split == "train", seed=seed, replication=replication
        )
        # drop_last: every batch has the same shape; the few samples left over at the end of an
        # epoch are seen in later epochs, which are shuffled differently.
        self.loader = StreamingDataLoader(
            self.dataset,
            batch_size=batch_size,
            num_workers=cfg.num_workers,
            collate_fn=collate,
            drop_last=True,
            pin_memory=torch.cuda.is_available(),
            worker_init_fn=ignore_stop_signals,
            generator=own_generator(),
        )
        if len(self.loader) == 0:
            raise DataError(
                f"the {split} split has {self.dataset.size} sequences, fewer than one batch of "
                f"{batch_size} per rank: lower train.micro_batch_size or add data"
            )

    def __iter__(self):
        while True:
            # One pass of the StreamingDataLoader is one epoch; streaming counts epochs itself
            # (and resumes inside one after load_state_dict), so looping is all it takes.
            yield from self.loader

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        return len(self.loader)

    @property
    def epoch(self) -> int:
        return max(self.state_dict()["epoch"], 0)

    def state_dict(self) -> dict:
        """{'epoch', 'sample_in_epoch', ...}: plain ints, JSON-able. The same on every rank.

        sample_in_epoch counts samples over all data-parallel ranks. A state taken after the
        last batch of an epoch resumes with the next epoch.
        """
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Resume from state_dict() of a loader over the same data, batch size and world.

        Takes effect at the next iter(). Streaming ignores a saved state older than the epoch it
        believes comes next, so that counter is rewound too: this also works on a loader that
        has already been iterated.
        """
        self.loader.load_state_dict(state)
        self.dataset.next_epoch = max(state["epoch"], 0)
        self.loader.num_samples_yielded = 0


def iter_val_batches(cfg, batch_size: int, *, replication: int = 1):
    """One in-order pass over the val split: (inputs, targets), the last batch possibly smaller."""
    meta = Path(cfg.dir) / "meta.json"
    if meta.is_file() and json.loads(meta.read_text())["splits"]["val"]["samples"] == 0:
        return  # data.val_fraction = 0: there is no validation split
    key = (os.path.abspath(cfg.dir), cfg.remote, batch_size, replication, cfg.num_workers)
    if key not in _VAL_LOADERS:
        from streaming import StreamingDataLoader

        dataset = _open_split(cfg, "val", batch_size, shuffle=False, seed=0, replication=replication)
        _VAL_LOADERS[key] = StreamingDataLoader(
            dataset,
            batch_size=batch_size,
            num_workers=cfg.num_workers,
            collate_fn=collate,
            pin_memory=torch.cuda.is_available(),
            worker_init_fn=ignore_stop_signals,
            generator=own_generator(),
        )
    # Each pass is a new epoch of the same dataset; unshuffled, every epoch is the same order.
    yield from _VAL_LOADERS[key]


_VAL_LOADERS: dict = {}  # one val dataset per process: see the module docstring


def own_generator() -> torch.Generator:
    """A loader's own generator for its workers' base seed: without one, each new iterator (one per epoch, one
    after a resume) draws from torch's global generator, so a resumed run's global state would drift from an
    uninterrupted run's. The order of the data is streaming's, seeded by data.seed, and does not depend on it."""
    return torch.Generator().manual_seed(0)


def ignore_stop_signals(worker_id: int) -> None:
    """In each loader worker: a stop signal is the trainer's to act on (save, then stop its workers)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def collate(samples: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.from_numpy(np.stack([s["tokens"] for s in samples]).astype(np.int64))
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def _open_split(cfg, split: str, batch_size: int, *, shuffle: bool, seed: int, replication: int):
    from streaming import StreamingDataset

    _check_rank_env()
    local = os.path.join(cfg.dir, split)
    remote = f"{cfg.remote.rstrip('/')}/{split}" if cfg.remote else None
    if remote is None and not os.path.isfile(os.path.join(local, "index.json")):
        raise DataError(
            f"no prepared {split} split at {local!r} (data.dir): run `orch data prepare` with this job's config first"
        )
    # num_canonical_nodes fixes the sample order; it is saved in state_dict() so a resume on
    # another number of nodes replays the same order. Passed explicitly only to silence a warning.
    nodes = int(os.environ.get("WORLD_SIZE", "1")) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    kwargs = dict(
        local=local,
        remote=remote,
        batch_size=batch_size,
        shuffle=shuffle,
        shuffle_seed=seed,
        num_canonical_nodes=max(nodes, 1),
        replication=replication if replication > 1 else None,
    )
    with _shared_memory_turn(local):
        dataset = _new_dataset(StreamingDataset, kwargs, cfg, local)
    _OPENED.append(local)
    return dataset


def _new_dataset(StreamingDataset, kwargs: dict, cfg, local: str):
    try:
        return StreamingDataset(**kwargs)
    except ValueError as e:
        # With a remote, streaming refuses a local cache folder that other shared memory claims:
        # another process on this machine uses it now, or a killed run left its memory behind.
        if "Reused local directory" not in str(e):
            raise
        # Clearing is safe for a lone process that has opened nothing yet: it only removes memory
        # that no other process maps. (streaming's clean_stale_shared_memory() can't be used: it
        # unlinks live jobs' memory too, and stops at the first free prefix, missing later ones.)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 or _OPENED or not _clear_stale_shared_memory():
            raise DataError(
                f"{local!r} (data.dir) is claimed as a cache of {cfg.remote!r} by another process on this "
                f"machine, or by a killed one. Give this job its own data.dir; or, if no other job runs "
                f"here, delete the leftovers: rm /dev/shm/[0-9][0-9][0-9][0-9][0-9][0-9]_*"
            ) from None
        print(f"data: cleared shared memory left by a killed run that claimed {local!r}")
        return StreamingDataset(**kwargs)


_OPENED: list = []  # the splits this process has opened: their shared memory is live, not stale


def _check_rank_env() -> None:
    """Streaming assumes one rank per node unless told otherwise: a silent hang with several."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and "LOCAL_WORLD_SIZE" not in os.environ:
        raise DataError(
            f"WORLD_SIZE={world} but LOCAL_WORLD_SIZE (ranks per node) is not set: launch with "
            f"torchrun or srun, which set it, or set it yourself"
        )


SHARED_MEMORY_LOCK = "/dev/shm/orch-streaming.lock"  # one per machine, beside the memory it guards


@contextmanager
def _shared_memory_turn(local: str):
    """Open a split's dataset while no other job on this machine opens one.

    Streaming names a dataset's shared memory by the first free prefix: it looks, then creates. Two jobs
    that open datasets at once on one machine pick the same prefix, and one dies (FileExistsError). So
    the node's first rank takes a machine-wide lock; its other ranks look only after the first barrier
    and have all found their prefix by the second, before the lock is released. Inside the turn, the
    first rank also removes the shared memory that killed loaders of this split left behind (a process
    killed with SIGKILL never unlinks it, and nothing else ever does); memory a live process maps,
    another split's, and anything not streaming's stays.
    """
    import fcntl

    import torch.distributed as dist

    lock = None
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        lock = open(SHARED_MEMORY_LOCK if os.path.isdir("/dev/shm") else os.devnull, "a")
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when closed, or when this process dies
        if local not in _OPENED:  # (this process maps no memory of this split: none of it is ours)
            _clear_stale_shared_memory(only_of=os.path.abspath(local))
    try:
        if dist.is_initialized():
            dist.barrier()
        yield
        if dist.is_initialized():
            dist.barrier()
    finally:
        if lock is not None:
            lock.close()


def _clear_stale_shared_memory(only_of: str | None = None) -> int:
    """Unlink streaming's /dev/shm/<6 digits>_<name> blocks that no other live process maps (Linux); with
    `only_of`, only the blocks of prefixes whose `_locals` block names that local folder.

    This process is left out of the check: streaming has just mapped the stale blocks itself,
    while looking for a free prefix. Returns how many blocks were removed.
    """
    pattern = re.compile(r"/dev/shm/(\d{6}_[a-z_]+)$", re.MULTILINE)
    mapped = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        if maps.parent.name != str(os.getpid()):
            try:
                mapped.update(pattern.findall(maps.read_text()))
            except OSError:  # gone, or another user's (whose memory can't clash with ours)
                pass
    blocks = [
        b for b in Path("/dev/shm").glob("[0-9][0-9][0-9][0-9][0-9][0-9]_*") if pattern.match(f"/dev/shm/{b.name}")
    ]
    if only_of is not None:
        ours = {b.name[:6] for b in blocks if b.name.endswith("_locals") and _names(b, only_of)}
        blocks = [b for b in blocks if b.name[:6] in ours]
    removed = 0
    for block in blocks:
        if block.name not in mapped:
            try:
                block.unlink()
                removed += 1
            except OSError:
                pass
    return removed


def _names(locals_block: Path, folder: str) -> bool:
    """Whether a `<prefix>_locals` block (size, then the local folders and the prefix, NUL-separated) names it."""
    try:
        return folder.encode() in locals_block.read_bytes()[4:].split(b"\0")
    except OSError:
        return False
