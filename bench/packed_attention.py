"""Packed-document attention: flex_attention with a BlockMask from doc ids against SDPA with the dense mask.

    python -m bench.packed_attention                         # S = 2048 and 8192 on this machine's device
    python -m bench.packed_attention --seqs 1024 --repeats 1 # quicker

One attention layer over rows packed with documents of 32 to 1024 tokens (SFT-like), grouped-query heads:
the mask built from the rows' doc ids (what SFT does once per micro-batch) and the attention itself, as
model/gpt.py calls it (model/document_attention.py). Both see the same q, k, v; their outputs must agree.
GPU: forward and backward in bf16, peak memory from torch.cuda.max_memory_allocated. CPU: the forward in
fp32 (flex_attention has no backward on CPUs, which is why CPU training keeps the dense mask), peak memory
as the process's resident memory above what it held before, sampled every 0.5 ms, with large allocations
served by mmap so that freed memory leaves the count. The baseline, the dense mask, is measured in the
same run; the figures are ratios: dense / flex.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import threading
import time

import torch
import torch.nn.functional as F

from bench.common import write_result
from model.document_attention import dense_document_mask, document_block_mask, flex


def packed_doc_ids(batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    """Rows of documents of 32 to 1024 tokens (the last one cut by the row's end), ids 0, 1, ... per row."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        lengths = []
        while sum(lengths) < seq:
            lengths.append(int(torch.randint(32, 1025, (1,), generator=gen)))
        rows.append(torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[:seq])
    return torch.stack(rows)


class PeakMemory:
    """Peak memory above the start, while the block runs: the allocator's count on a GPU, resident memory on a CPU."""

    def __init__(self, device: torch.device):
        self.device, self.bytes = device, 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            self.start = self.peak = _rss()
            self.done = threading.Event()
            self.sampler = threading.Thread(target=self._sample)
            self.sampler.start()
        return self

    def _sample(self):
        while not self.done.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(0.0005)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated() - self.start
        else:
            self.done.set()
            self.sampler.join()
            self.bytes = max(self.peak, _rss()) - self.start


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def one_pass(kind: str, q, k, v, doc_ids, backward: bool) -> torch.Tensor:
    """The mask from the doc ids, then the attention (and its backward): what one packed micro-batch pays."""
    if kind == "dense":
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=dense_document_mask(doc_ids), enable_gqa=True)
    else:
        out = flex(q, k, v, block_mask=document_block_mask(doc_ids), enable_gqa=True)
    if backward:
        out.float().square().sum().backward()
    return out.detach()


def measure(seq: int, args, device: torch.device) -> dict:
    backward = device.type == "cuda"
    dtype = torch.bfloat16 if backward else torch.float32
    gen = torch.Generator().manual_seed(seq)
    shape = lambda heads: (args.batch, heads, seq, args.head_dim)  # noqa: E731
    q, k, v = (
        torch.randn(shape(h), generator=gen).to(device, dtype).requires_grad_(backward)
        for h in (args.heads, args.kv_heads, args.kv_heads)
    )
    doc_ids = packed_doc_ids(args.batch, seq).to(device)
    result = {"documents_per_row": float(doc_ids.max(dim=1).values.float().mean()) + 1}
    outputs = {}
    with torch.set_grad_enabled(backward):
        for kind in ("flex", "dense"):  # flex first: its compilation is a warm-up, not timed
            outputs[kind] = one_pass(kind, q, k, v, doc_ids, backward)
        times = {"dense": [], "flex": []}
        for _ in range(args.repeats):  # interleaved: a busy neighbour slows both alike
            for kind in times:
                for t in (q, k, v):
                    t.grad = None
                with PeakMemory(device) as peak:
                    start = time.perf_counter()
                    one_pass(kind, q, k, v, doc_ids, backward)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    times[kind].append(time.perf_counter() - start)
                result[f"{kind}_peak_mib"] = max(result.get(f"{kind}_peak_mib", 0), peak.bytes / 2**20)
    for kind in times:
        result[f"{kind}_ms"] = 1000 * min(times[kind])
    result["max_abs_diff"] = float((outputs["flex"].float() - outputs["dense"].float()).abs().max())
    result["speedup"] = result["dense_ms"] / result["flex_ms"]
    result["memory_ratio"] = result["dense_peak_mib"] / max(result["flex_peak_mib"], 1e-9)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqs", type=int, nargs="+", default=[2048, 8192])
    p.add_argument("--batch", type=int, default=2, help="packed rows per micro-batch")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="best of N")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":  # large blocks from mmap: what is freed leaves the resident count at once
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD = 64 KiB

    figures = {}
    for seq in args.seqs:
        r = measure(seq, args, device)
        assert r["max_abs_diff"] < (5e-2 if device.type == "cuda" else 1e-4), r
        print(
            f"S={seq}: {r['documents_per_row']:.1f} documents a row | dense mask {r['dense_ms']:.1f} ms, "
            f"{r['dense_peak_mib']:.0f} MiB | flex {r['flex_ms']:.1f} ms, {r['flex_peak_mib']:.0f} MiB | "
            f"{r['speedup']:.2f}x faster, {r['memory_ratio']:.1f}x less memory",
            flush=True,
        )
        figures.update({f"s{seq}_{k}": v for k, v in r.items()})
    config = {
        "batch": args.batch,
        "heads": args.heads,
        "kv_heads": args.kv_heads,
        "head_dim": args.head_dim,
        "seqs": args.seqs,
        "document_tokens": [32, 1024],
        "repeats": args.repeats,
        "device": device.type,
        "dtype": "bfloat16" if device.type == "cuda" else "float32",
        "passes": "forward + backward" if device.type == "cuda" else "forward (no flex backward on CPUs)",
        "threads": torch.get_num_threads(),
    }
    print(f"wrote {write_result('packed_attention', config, figures)}")


if __name__ == "__main__":
    main()
