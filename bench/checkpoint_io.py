"""Checkpoint save/load throughput against plain file I/O of the same bytes, in the same process.

    python -m bench.checkpoint_io            # ~1 GB of model + AdamW state
    python -m bench.checkpoint_io --gb 0.2   # smaller, quicker

Both sides fsync what they write, and both read from the page cache after the write, so the
ratio measures orch's overhead (safetensors framing, DCP planning, manifest hashing), not the disk.

Async save is measured inside training steps, as the trainer uses it: a save starts after a step,
the next step's forward and backward run while the state is copied, and `wait_staged()` comes
before `optimizer.step()`. "Blocked" is the time the training thread spends in `save()` and
`wait_staged()`; "extra step time" is how much longer the steps that ran until the save was
committed took than as many steps without a save (on a CPU the background copy, write and hashing
compete with the step's own threads for the cores).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import write_result
from model.config import GPTConfig
from model.gpt import GPT
from training.async_checkpoint import AsyncSaver, stage
from training.checkpoint import find_resumable, load_checkpoint, save_checkpoint


def model_for(gb: float) -> tuple[GPT, torch.optim.Optimizer]:
    """A GPT whose fp32 weights + two AdamW moments take about `gb` gigabytes."""
    d = 1024
    per_layer = 12 * d * d + 3 * d  # attention 4d^2 + SwiGLU 3 * d * (8/3 d) = 12 d^2
    n_layer = max(1, int(gb * 1e9 / 12 / per_layer))
    model = GPT(GPTConfig(vocab_size=8192, n_layer=n_layer, n_head=16, d_model=d, max_seq_len=256))
    model.init_weights(seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # materializes exp_avg / exp_avg_sq
    return model, opt


def tensors_of(model, opt) -> list[torch.Tensor]:
    out = [p.detach() for p in model.parameters()]
    for state in opt.state.values():
        out += [v for v in state.values() if v.ndim > 0]
    return out


def plain_write(tensors, folder: Path) -> None:
    folder.mkdir(parents=True)
    for i, t in enumerate(tensors):
        with open(folder / f"{i}.bin", "wb") as f:
            f.write(t.numpy().tobytes())
            f.flush()
            os.fsync(f.fileno())


def plain_read(tensors, folder: Path) -> None:
    for i, t in enumerate(tensors):
        data = np.fromfile(folder / f"{i}.bin", dtype=np.float32)
        t.copy_(torch.from_numpy(data).view(t.shape))


def train_step(model, opt, tokens, saver=None) -> float:
    """One training step; with a saver, it waits for the save's copy before changing the weights.
    Returns the seconds the thread was blocked in wait_staged()."""
    logits = model(tokens[:, :-1])
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
    blocked = 0.0
    if saver is not None:
        blocked = timed(saver.wait_staged)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return blocked


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    model, opt = model_for(args.gb)
    tensors = tensors_of(model, opt)
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    tmp = Path(tempfile.mkdtemp(prefix="orch-bench-"))
    tokens = torch.randint(0, model.cfg.vocab_size, (1, 129), generator=torch.Generator().manual_seed(0))
    train_step(model, opt, tokens)  # warm-up
    rows = {
        "plain_save": [],
        "orch_save": [],
        "plain_load": [],
        "orch_load": [],
        "async_blocked": [],
        "step": [],
        "async_extra": [],
        "staging_copy": [],
    }
    saver = AsyncSaver()
    try:
        for r in range(args.repeats):
            run = tmp / f"run{r}"
            rows["plain_save"].append(timed(lambda: plain_write(tensors, tmp / f"plain{r}")))
            rows["orch_save"].append(timed(lambda: save_checkpoint(run, 1, model, opt, {"step": 1})))
            rows["plain_load"].append(timed(lambda: plain_read(tensors, tmp / f"plain{r}")))
            rows["orch_load"].append(timed(lambda: load_checkpoint(find_resumable(run), model, opt)))
            shutil.rmtree(tmp / f"plain{r}")
            shutil.rmtree(run)
        # Async, inside training steps, in a loop of its own (the saves and loads above leave the page cache
        # writing back for a while): plain steps, then the steps from a save's start until it is committed.
        for r in range(2 * args.repeats):  # twice as many: the figure taken from these is a median
            plain_step = statistics.median(timed(lambda: train_step(model, opt, tokens)) for _ in range(3))
            rows["step"].append(plain_step)
            start = time.perf_counter()
            save_call = timed(lambda: saver.save(tmp / f"async{r}", 1, model, opt, {"step": 1}, 1, 0))
            rows["async_blocked"].append(save_call + train_step(model, opt, tokens, saver))
            steps = 1
            while not saver.pending.done():
                train_step(model, opt, tokens, saver)
                steps += 1
            rows["async_extra"].append(time.perf_counter() - start - steps * plain_step)
            saver.wait()
            rows["staging_copy"].append(timed(lambda: stage(dict(enumerate(tensors)), saver.buffers, "bench")))
            shutil.rmtree(tmp / f"async{r}")
    finally:
        saver.close()
        shutil.rmtree(tmp, ignore_errors=True)
    best = {k: min(v) for k, v in rows.items()}
    gbps = {k: nbytes / v / 1e9 for k, v in best.items() if k.startswith(("plain_", "orch_"))}
    extra = statistics.median(rows["async_extra"])  # noisy: the median, not the best, of what the steps lost
    figures = {
        "bytes": nbytes,
        **{f"{k}_GBps": round(v, 3) for k, v in gbps.items()},
        "save_ratio": round(gbps["orch_save"] / gbps["plain_save"], 3),
        "load_ratio": round(gbps["orch_load"] / gbps["plain_load"], 3),
        "async_blocked_s": round(best["async_blocked"], 3),
        "sync_save_s": round(best["orch_save"], 3),
        "async_block_ratio": round(best["async_blocked"] / best["orch_save"], 4),
        "step_s": round(best["step"], 3),
        "async_extra_step_time_s": round(extra, 3),
        "async_cost_ratio": round(extra / best["orch_save"], 3),
        "staging_copy_s": round(best["staging_copy"], 3),
    }
    print(f"state {nbytes / 1e9:.2f} GB   (best of {args.repeats})")
    print(f"{'':12}{'plain GB/s':>12}{'orch GB/s':>12}{'ratio':>8}")
    for op in ("save", "load"):
        print(f"{op:12}{gbps['plain_' + op]:12.2f}{gbps['orch_' + op]:12.2f}{figures[op + '_ratio']:8.2f}")
    print(
        f"async save blocks training {best['async_blocked']:.3f} s vs a synchronous save's {best['orch_save']:.3f} s: "
        f"{figures['async_block_ratio']:.1%} (target < 5%); the copy alone takes {best['staging_copy']:.3f} s"
    )
    print(
        f"the steps that overlap an async save take {extra:.3f} s longer in all (median; a step alone takes "
        f"{best['step']:.3f} s): {figures['async_cost_ratio']:.2f} times a synchronous save"
    )
    print("wrote", write_result("checkpoint_io", {"gb": args.gb, "repeats": args.repeats}, figures))


if __name__ == "__main__":
    main()
