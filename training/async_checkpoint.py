"""Checkpoints written in the background (`checkpoint.async_save: true`).

A save returns at once. A worker thread first copies the model and optimizer state into CPU memory
(buffers kept between saves: async saving holds a second copy of the state in host memory), then
writes, hashes and commits the checkpoint exactly as a synchronous save does
(training.checkpoint.write_checkpoint). The copy overlaps the next step's forward and backward,
which only read the weights; the trainer calls `wait_staged()` before `optimizer.step()`, the first
thing that changes them, so the step is blocked only for the part of the copy that has not finished
by then. On a GPU the copy runs on a CUDA stream of its own into pinned memory, and stays there: the
staged state takes no GPU memory.
Two rules keep that safe on many ranks:
- the worker's collectives run on a process group of their own (gloo), so they never
  interleave with the training step's all-reduces on the default group;
- at most one save is in flight: the next save, a preemption stop or the end of training
  waits for it first, so every rank issues the checkpoint collectives in the same order.
A save that failed (a full disk) raises its error in the training thread at that wait.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from jobspec.faults import fault
from training.checkpoint import _model_tensors, _optim_tensors, rng_state, write_checkpoint


def stage(obj, buffers: dict, key: str = ""):
    """A CPU copy of a (nested) state dict; DTensors keep their mesh and placements. The copies go into
    `buffers` (key path -> tensor), kept from one save to the next: allocating and first touching a
    gigabyte of fresh memory costs more than copying into memory already mapped."""
    if isinstance(obj, dict):
        return {k: stage(v, buffers, f"{key}/{k}") for k, v in obj.items()}
    if isinstance(obj, DTensor):
        # The source's layout around a shard that stays in host memory, as torch's own staging
        # (_create_cpu_state_dict) builds it: DTensor.from_local would move the copy onto the mesh's GPU,
        # a second GPU copy of the state until the write ends. DCP writes from the local shard and its spec.
        return DTensor(_copy(obj.to_local(), buffers, key), obj._spec, requires_grad=False)
    if isinstance(obj, torch.Tensor):
        return _copy(obj, buffers, key)
    return obj


def _copy(tensor: torch.Tensor, buffers: dict, key: str) -> torch.Tensor:
    buf = buffers.get(key)
    if buf is None or buf.shape != tensor.shape or buf.dtype != tensor.dtype:
        buf = buffers[key] = torch.empty(
            tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=tensor.is_cuda
        )  # pinned: a faster copy from the GPU
    buf.copy_(tensor.detach(), non_blocking=tensor.is_cuda)
    return buf


class AsyncSaver:
    def __init__(self, device: torch.device | str = "cpu", timeout_s: Optional[float] = None):
        """timeout_s: parallel.collective_timeout_s. The saver's group must give up on a silent rank as soon as the
        training group does: torch's default for a new group is 30 minutes, and a process whose writer waits on it
        can't exit, so a hung peer would hold the whole job that long (docs/reliability.md)."""
        # Created by every rank at the same point (a collective), before the first save.
        timeout = timedelta(seconds=timeout_s) if timeout_s else None
        self.group = dist.new_group(backend="gloo", timeout=timeout) if dist.is_initialized() else None
        # The copy and the write are separate tasks on two threads: the step waits for the first only.
        self.copier = ThreadPoolExecutor(max_workers=1, thread_name_prefix="orch-checkpoint-copy")
        self.writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="orch-checkpoint-write")
        self.staged: Optional[Future] = None  # the save in flight's copy of the state, once complete
        self.pending: Optional[Future] = None  # the save in flight: resolves to its committed folder
        self.buffers: dict[str, torch.Tensor] = {}  # the staging copies, reused by every save
        self.stream = torch.cuda.Stream(device) if torch.device(device).type == "cuda" else None

    def save(
        self, run_dir: Path, step: int, model, optimizer, trainer_state: dict, keep_last: int, keep_every: int
    ) -> None:
        """Start a save of the current state and return at once; call `wait_staged()` before the
        state next changes."""
        self.wait()
        # Gathered here, in the training thread: the state-dict helpers may talk to the default process group.
        model_state, optim_state = _model_tensors(model), _optim_tensors(model, optimizer)
        ready = None
        if self.stream is not None:  # the copy must start after the step that produced these weights
            ready = torch.cuda.Event()
            ready.record()
        self.staged = self.copier.submit(self._stage, ready, model_state, optim_state)
        self.pending = self.writer.submit(
            self._write, self.staged, run_dir, step, rng_state(), dict(trainer_state), keep_last, keep_every
        )

    def _stage(self, ready, model_state: dict, optim_state: dict) -> tuple[dict, dict]:
        fault("checkpoint.staging")
        if self.stream is None:
            return stage(model_state, self.buffers, "model"), stage(optim_state, self.buffers, "optim")
        torch.cuda.set_device(self.stream.device)  # a new thread starts on GPU 0, not on this rank's GPU
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(ready)
            copies = stage(model_state, self.buffers, "model"), stage(optim_state, self.buffers, "optim")
        self.stream.synchronize()  # the copies have landed; only now may the sources be freed
        return copies

    def _write(self, staged: Future, run_dir, step, rng, trainer_state, keep_last, keep_every) -> Path:
        model_copy, optim_copy = staged.result()
        return write_checkpoint(
            run_dir, step, model_copy, optim_copy, rng, trainer_state, keep_last, keep_every, self.group
        )

    def wait_staged(self) -> None:
        """Block until the save in flight has its own copy of the state (the weights may change after)."""
        if self.staged is not None:
            staged, self.staged = self.staged, None
            staged.result()

    def wait(self) -> Optional[Path]:
        """Block until the save in flight (if any) is committed; return its folder."""
        self.wait_staged()
        if self.pending is None:
            return None
        future, self.pending = self.pending, None
        return future.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.copier.shutdown(wait=True)
            self.writer.shutdown(wait=True)
