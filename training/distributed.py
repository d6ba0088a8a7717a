"""Process group and device mesh, however the processes were launched.

torchrun sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR; Slurm's srun sets SLURM_PROCID and
friends instead, and the Slurm executor passes MASTER_ADDR/PORT. A lone process is rank 0 of 1.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from training.cpu_setup import set_up_cpu_process


@dataclass
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    mesh: Optional[DeviceMesh]  # dims ("dp_replicate", "dp_shard", "tp"); None for one process
    dp_replicate: int
    dp_shard: int
    tp: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp_size(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def dp_rank(self) -> int:
        """Which data-parallel replica this rank is: tensor-parallel peers share it."""
        return self.rank // self.tp

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def _env_from_slurm() -> None:
    """Map Slurm's task variables onto torch.distributed's, when srun started us without torchrun."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ.get("SLURM_NTASKS", "1")
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    os.environ.setdefault("LOCAL_WORLD_SIZE", os.environ.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0])


def resolve_mesh_shape(
    world_size: int, dp_replicate: int, dp_shard: int, tp: int, gpus_per_node: Optional[int] = None
) -> tuple[int, int, int]:
    """Fill in dp_shard=-1 and check that the product is the world size.

    On several nodes the default (dp_replicate 1, dp_shard -1) is HSDP: shard within a node, replicate across
    nodes, as torchtitan lays it out. One shard group over every node would send each reduce-scatter and
    all-gather over the network between nodes; HSDP keeps them on the node's links and crosses the network
    once a step, with an all-reduce of 1/gpus_per_node of the gradients. dp_shard set explicitly keeps it."""
    nodes = world_size // gpus_per_node if gpus_per_node else 1
    if dp_shard == -1 and dp_replicate == 1 and nodes > 1 and world_size % gpus_per_node == 0:
        if gpus_per_node % tp == 0:
            dp_replicate = nodes
    if dp_shard == -1:
        if world_size % (dp_replicate * tp):
            raise ValueError(
                f"world size {world_size} is not divisible by parallel.dp_replicate * parallel.tp "
                f"= {dp_replicate} * {tp}"
            )
        dp_shard = world_size // (dp_replicate * tp)
    if dp_replicate * dp_shard * tp != world_size:
        raise ValueError(
            f"parallel.dp_replicate * parallel.dp_shard * parallel.tp = {dp_replicate} * {dp_shard} * {tp} "
            f"= {dp_replicate * dp_shard * tp}, but the job has {world_size} processes"
        )
    return dp_replicate, dp_shard, tp


def process_group_backend(use_cuda: bool) -> str:
    """GPUs: NCCL for CUDA tensors and gloo for CPU ones (checkpoint verification, small flags), as
    torchtitan does; a NCCL-only default group fails on the first CPU tensor. CPUs: gloo."""
    return "cpu:gloo,cuda:nccl" if use_cuda else "gloo"


def init_distributed(parallel_cfg, device_pref: str = "auto") -> Dist:
    _env_from_slurm()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device_pref == "auto" else device_pref.startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        set_up_cpu_process()
    gpus_per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))  # torchrun's; Slurm's, mapped above
    shape = resolve_mesh_shape(
        world_size, parallel_cfg.dp_replicate, parallel_cfg.dp_shard, parallel_cfg.tp, gpus_per_node
    )
    mesh = None
    if world_size > 1:
        if not dist.is_initialized():
            # a rank that stops answering (a hung process, a lost node) fails its peers' next collective after
            # this long, instead of holding them forever: the executor then restarts the run (docs/reliability.md)
            dist.init_process_group(
                process_group_backend(use_cuda), timeout=timedelta(seconds=parallel_cfg.collective_timeout_s)
            )
        mesh = init_device_mesh(device.type, shape, mesh_dim_names=("dp_replicate", "dp_shard", "tp"))
    return Dist(rank, world_size, local_rank, device, mesh, *shape)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
