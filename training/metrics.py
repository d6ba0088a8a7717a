"""metrics.jsonl (one JSON object per logged step) and the human-readable progress line."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Optional

import torch

# Dense bf16 peak FLOP/s per device, for MFU. Unknown devices report no MFU rather than a guess.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


def peak_flops(device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_BF16_FLOPS.items():
        if key in name:
            return flops
    return None


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class MetricsLogger:
    """Rank 0 appends to metrics.jsonl and prints a progress line; other ranks do nothing."""

    def __init__(self, run_dir: Path, enabled: bool, max_steps: int):
        self.enabled = enabled
        self.max_steps = max_steps
        self.path = run_dir / "metrics.jsonl"
        self.start = time.time()
        self._file = open(self.path, "a") if enabled else None

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **record}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        print(self._line(record), flush=True)

    def _line(self, r: dict) -> str:
        if "loss" not in r and "val_bpb" not in r:  # another kind's evaluation: its numbers as they are
            numbers = [f"{k} {v:.4g}" for k, v in r.items()
                       if k not in ("time", "step") and isinstance(v, (int, float)) and not isinstance(v, bool)]
            return " | ".join([f"step {r['step']:>6}/{self.max_steps}", *numbers])
        if "val_loss" in r:
            extra = f" | xz {r['xz_bpb']:.3f} bpb" if r.get("xz_bpb") else ""
            return f"step {r['step']:>6}/{self.max_steps} | val loss {r['val_loss']:.4f} | val {r['val_bpb']:.3f} bpb{extra}"
        parts = [f"step {r['step']:>6}/{self.max_steps}", f"loss {r['loss']:.4f}", f"lr {r['lr']:.2e}",
                 f"grad {r['grad_norm']:.2f}", f"{r['tokens_per_s']:,.0f} tok/s"]
        if r.get("mfu") is not None:
            parts.append(f"MFU {100 * r['mfu']:.1f}%")
        if r.get("eta_s") is not None:
            parts.append(f"ETA {format_duration(r['eta_s'])}")
        return " | ".join(parts)

    def close(self) -> None:
        if self._file:
            self._file.close()


def say(msg: str, enabled: bool = True) -> None:
    if enabled:
        print(msg, file=sys.stdout, flush=True)
