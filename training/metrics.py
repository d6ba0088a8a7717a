"""metrics.jsonl (one JSON object per logged step) and the human-readable progress line."""

from __future__ import annotations

import json
import re
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Optional, Sequence

import torch

# Dense bf16 peak FLOP/s (no sparsity) by the exact device name torch reports, most specific first: an H100
# PCIe has three quarters of an SXM's. A device not listed reports no MFU rather than a wrong one.
PEAK_BF16_FLOPS = (
    (r"H100.*(PCIe|PCIE)", 756e12),
    (r"H100 NVL", 835e12),
    (r"H100", 989.4e12),  # SXM5 ("NVIDIA H100 80GB HBM3")
    (r"H200 NVL", 835e12),
    (r"H200", 989.4e12),  # SXM
    (r"B200", 2250e12),
    (r"A100", 312e12),  # SXM4 and PCIe alike
    (r"L40S", 362.05e12),
)


def peak_flops(device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    return peak_flops_of(torch.cuda.get_device_name(device))


def peak_flops_of(device_name: str) -> Optional[float]:
    for pattern, flops in PEAK_BF16_FLOPS:
        if re.search(pattern, device_name):
            return flops
    return None


class Throughput:
    """Tokens per second and MFU over the steps since the last report, counting training time only
    (validation and checkpoints excluded: they are neither tokens nor model FLOPs)."""

    def __init__(self, flops_per_token: float, world_size: int, peak: Optional[float]):
        self.flops_per_token, self.world_size, self.peak = flops_per_token, world_size, peak
        self.tokens, self.seconds = 0, 0.0

    @contextmanager
    def timing(self):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - start

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    def take(self) -> dict:
        tps = self.tokens / max(self.seconds, 1e-9)
        mfu = tps * self.flops_per_token / self.world_size / self.peak if self.peak else None
        self.tokens, self.seconds = 0, 0.0
        return {"tokens_per_s": tps, "mfu": mfu}


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class MetricsLogger:
    """Rank 0 appends to metrics.jsonl and prints a progress line; other ranks do nothing."""

    def __init__(self, run_dir: Path, enabled: bool, max_steps: int, trackers: Sequence = ()):
        self.enabled = enabled
        self.max_steps = max_steps
        self.path = run_dir / "metrics.jsonl"
        self.start = time.time()
        self._file = open(self.path, "a") if enabled else None
        self.trackers = list(trackers) if enabled else []  # training/trackers.py: TensorBoard and the like

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **record}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        for tracker in self.trackers:
            tracker.log(record)
        print(self._line(record), flush=True)

    def _line(self, r: dict) -> str:
        if "loss" not in r and "val_bpb" not in r:  # another kind's evaluation: its numbers as they are
            numbers = [
                f"{k} {v:.4g}"
                for k, v in r.items()
                if k not in ("time", "step") and isinstance(v, (int, float)) and not isinstance(v, bool)
            ]
            return " | ".join([f"step {r['step']:>6}/{self.max_steps}", *numbers])
        if "val_loss" in r:
            extra = f" | xz {r['xz_bpb']:.3f} bpb" if r.get("xz_bpb") else ""
            step = f"step {r['step']:>6}/{self.max_steps}"
            return f"{step} | val loss {r['val_loss']:.4f} | val {r['val_bpb']:.3f} bpb{extra}"
        parts = [
            f"step {r['step']:>6}/{self.max_steps}",
            f"loss {r['loss']:.4f}",
            f"lr {r['lr']:.2e}",
            f"grad {r['grad_norm']:.2f}",
            f"{r['tokens_per_s']:,.0f} tok/s",
        ]
        if r.get("mfu") is not None:
            parts.append(f"MFU {100 * r['mfu']:.1f}%")
        if r.get("eta_s") is not None:
            parts.append(f"ETA {format_duration(r['eta_s'])}")
        return " | ".join(parts)

    def close(self) -> None:
        if self._file:
            self._file.close()
        for tracker in self.trackers:
            tracker.close()


def say(msg: str, enabled: bool = True) -> None:
    if enabled:
        print(msg, file=sys.stdout, flush=True)
