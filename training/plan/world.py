"""The fake world: one process plays rank 0 of a world of N GPUs.

torch.distributed runs with the `fake` backend on a FakeStore (as torch's own tests and torchtitan's memory
estimation do): every collective returns at once without moving data, so the job's real mesh, FSDP2 and tensor
parallelism run in one process at any world size. Tensors are FakeTensors (measure.py): shapes, dtypes and
devices, no memory.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from training.distributed import Dist, resolve_mesh_shape


@contextmanager
def fake_world(world_size: int, parallel_cfg, gpus_per_node: int | None = None) -> Iterator[Dist]:
    """Rank 0 of `world_size` with the job's mesh (dp_replicate x dp_shard x tp), as training/distributed.py
    builds it on the nodes; the process group is gone again on the way out."""
    # importing it registers the fake backend
    from torch.testing._internal.distributed.fake_pg import FakeStore

    # DTensor's advice on the gradient norm's two-dimension all-reduce is for torch's developers, not the job's
    logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)
    if dist.is_initialized():
        raise RuntimeError("orch plan needs a process without a process group of its own")
    shape = resolve_mesh_shape(
        world_size, parallel_cfg.dp_replicate, parallel_cfg.dp_shard, parallel_cfg.tp, gpus_per_node
    )
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        # The mesh is built from real tensors (its rank map); the model is built fake, inside measure.py.
        mesh = (
            init_device_mesh("cpu", shape, mesh_dim_names=("dp_replicate", "dp_shard", "tp"))
            if world_size > 1
            else None
        )
        yield Dist(0, world_size, 0, torch.device("cpu"), mesh, *shape)
    finally:
        dist.destroy_process_group()
