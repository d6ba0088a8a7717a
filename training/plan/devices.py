"""The GPUs `orch plan` knows: memory, peak dense bf16 FLOP/s, memory and network bandwidth. The one table of them.

Sources (vendor datasheets, SXM parts, dense: without 2:4 sparsity):
  H100 SXM5 80GB: 989 TFLOP/s bf16, 3.35 TB/s HBM3, NVLink 4 900 GB/s (NVIDIA H100 Tensor Core GPU datasheet)
  H200 SXM 141GB: 989 TFLOP/s bf16, 4.8 TB/s HBM3e, NVLink 4 900 GB/s (NVIDIA H200 datasheet)
  A100 SXM4 80GB / 40GB: 312 TFLOP/s bf16, 2.039 / 1.555 TB/s HBM2e, NVLink 3 600 GB/s (NVIDIA A100 datasheet)
  Between nodes: one 400 Gb/s InfiniBand NDR (H100/H200) or 200 Gb/s HDR (A100) adapter per GPU, 50 / 25 GB/s.
NVLink figures are the sum of both directions; a ring collective's bus bandwidth is about half of it, which is
what `nvlink_bytes_s` holds.
"""

from __future__ import annotations

from dataclasses import dataclass

GB = 1e9
GIB = 2**30


@dataclass(frozen=True)
class Device:
    name: str
    memory_bytes: float  # what tensors may use of the GPU (below)
    bf16_flops: float  # peak dense bf16 tensor-core FLOP/s
    hbm_bytes_s: float
    nvlink_bytes_s: float  # a ring collective's bandwidth per GPU within a node
    network_bytes_s: float  # per GPU between nodes

    @property
    def memory_gib(self) -> float:
        return self.memory_bytes / GIB


# The H100's and A100's "80GB" are 80 GiB of HBM of which ~79.1 GiB are usable by tensors (torch.cuda.mem_get_info
# on an idle GPU), the H200's "141GB" ~139.8 GiB: the figures below are those usable amounts.
DEVICES: dict[str, Device] = {
    "h100": Device("NVIDIA H100 SXM5 80GB", 79.1 * GIB, 989e12, 3.35e12, 450 * GB, 50 * GB),
    "h200": Device("NVIDIA H200 SXM 141GB", 139.8 * GIB, 989e12, 4.8e12, 450 * GB, 50 * GB),
    "a100-80g": Device("NVIDIA A100 SXM4 80GB", 79.1 * GIB, 312e12, 2.039e12, 300 * GB, 25 * GB),
    "a100-40g": Device("NVIDIA A100 SXM4 40GB", 39.4 * GIB, 312e12, 1.555e12, 300 * GB, 25 * GB),
}
DEFAULT_DEVICE = "h100"


def device_for(name: str | None, gpu_mem_gib: float | None = None) -> Device:
    """A device by name (default h100); gpu_mem_gib (resources.gpu_mem_gib) replaces its memory."""
    name = name or DEFAULT_DEVICE
    if name not in DEVICES:
        raise ValueError(f"--device {name!r} is not a device orch plan knows: {', '.join(DEVICES)}")
    device = DEVICES[name]
    if gpu_mem_gib is not None:
        from dataclasses import replace

        device = replace(
            device, name=f"{device.name}, {gpu_mem_gib:g} GiB (resources.gpu_mem_gib)", memory_bytes=gpu_mem_gib * GIB
        )
    return device
