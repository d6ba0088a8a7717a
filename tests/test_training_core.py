"""Training-core decisions that only show on GPUs or at scale, tested here on the CPU: the process group's
backends, the device table behind MFU, and what the throughput window counts."""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

from training.distributed import process_group_backend
from training.metrics import Throughput, peak_flops_of


def test_gpu_runs_get_a_cpu_backend_beside_nccl():
    """Checkpoint verification and other small collectives use CPU tensors; a NCCL-only group fails on them."""
    assert process_group_backend(use_cuda=True) == "cpu:gloo,cuda:nccl"
    assert process_group_backend(use_cuda=False) == "gloo"


def test_a_device_backend_string_group_reduces_cpu_tensors(tmp_path):
    """The same form of backend string, here with gloo alone: a CPU all-reduce goes through."""
    dist.init_process_group("cpu:gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        flag = torch.tensor([1])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        assert flag.item() == 1
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989.4e12),  # SXM
    ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989.4e12),
    ("NVIDIA H200 NVL", 835e12),
    ("NVIDIA B200", 2250e12),
    ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA A100 80GB PCIe", 312e12),
    ("NVIDIA GeForce RTX 4090", None),  # unknown: no MFU rather than a wrong one
    ("Tesla T4", None),
])
def test_mfu_uses_the_exact_device(name, peak):
    assert peak_flops_of(name) == peak


def test_throughput_counts_training_time_only():
    meter = Throughput(flops_per_token=1e6, world_size=1, peak=1e12)
    with meter.timing():
        time.sleep(0.05)  # stands in for a step's compute: the quantity measured, not a synchronization
    meter.add(1000)
    time.sleep(0.2)  # validation or a checkpoint between steps: not counted
    report = meter.take()
    assert 1000 / 0.2 < report["tokens_per_s"] <= 1000 / 0.05 * 1.01
    assert report["mfu"] == pytest.approx(report["tokens_per_s"] * 1e6 / 1e12)
    assert meter.take()["tokens_per_s"] == 0  # a window starts empty
