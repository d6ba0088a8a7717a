"""Checkpoints written in the background (`checkpoint.async_save: true`).

The training step waits only while the model and optimizer state are copied into CPU memory
(buffers kept between saves: async saving holds a second copy of the state in host memory);
a worker thread then writes, hashes and commits the checkpoint exactly as a synchronous save
does (training.checkpoint.write_checkpoint). Two rules keep that safe on many ranks:
- the worker's collectives run on a process group of their own (gloo), so they never
  interleave with the training step's all-reduces on the default group;
- at most one save is in flight: the next save, a preemption stop or the end of training
  waits for it first, so every rank issues the checkpoint collectives in the same order.
A save that failed (a full disk) raises its error in the training thread at that wait.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from training.checkpoint import _model_tensors, _optim_tensors, rng_state, write_checkpoint


def stage(obj, buffers: dict, key: str = ""):
    """A CPU copy of a (nested) state dict; DTensors keep their mesh and placements. The copies go into
    `buffers` (key path -> tensor), kept from one save to the next: allocating and first touching a
    gigabyte of fresh memory costs more than copying into memory already mapped."""
    if isinstance(obj, dict):
        return {k: stage(v, buffers, f"{key}/{k}") for k, v in obj.items()}
    if isinstance(obj, DTensor):
        local = _copy(obj.to_local(), buffers, key)
        return DTensor.from_local(local, obj.device_mesh, obj.placements, run_check=False,
                                  shape=obj.shape, stride=obj.stride())
    if isinstance(obj, torch.Tensor):
        return _copy(obj, buffers, key)
    return obj


def _copy(tensor: torch.Tensor, buffers: dict, key: str) -> torch.Tensor:
    buf = buffers.get(key)
    if buf is None or buf.shape != tensor.shape or buf.dtype != tensor.dtype:
        buf = buffers[key] = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu",
                                         pin_memory=tensor.is_cuda)  # pinned: a faster copy from the GPU
    buf.copy_(tensor.detach(), non_blocking=tensor.is_cuda)
    return buf


class AsyncSaver:
    def __init__(self):
        # Created by every rank at the same point (a collective), before the first save.
        self.group = dist.new_group(backend="gloo") if dist.is_initialized() else None
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="orch-checkpoint")
        self.pending: Optional[Future] = None
        self.buffers: dict[str, torch.Tensor] = {}  # the staging copies, reused by every save

    def save(self, run_dir: Path, step: int, model, optimizer, trainer_state: dict,
             keep_last: int, keep_every: int) -> None:
        """Copy the state now; write it in the background."""
        self.wait()
        model_state = stage(_model_tensors(model), self.buffers, "model")
        optim_state = stage(_optim_tensors(model, optimizer), self.buffers, "optim")
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the non-blocking copies from the GPU must land before the writer reads them
        self.pending = self.worker.submit(write_checkpoint, run_dir, step, model_state, optim_state, rng_state(),
                                          trainer_state, keep_last, keep_every, self.group)

    def wait(self) -> Optional[Path]:
        """Block until the save in flight (if any) is committed; return its folder."""
        if self.pending is None:
            return None
        future, self.pending = self.pending, None
        return future.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.worker.shutdown(wait=True)
