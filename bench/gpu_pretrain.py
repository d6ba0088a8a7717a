"""Pretraining tokens/s, MFU and peak memory on one GPU, for the model sizes of issue 8.

    python -m bench.gpu_pretrain                      # 125m, 350m, 1.3b at seq 2048, bf16, compiled
    python -m bench.gpu_pretrain --sizes 125m --steps 20
    python -m bench.gpu_pretrain --sizes tiny --device cpu --seq 128 --steps 3   # a smoke run without a GPU

The step is the trainer's: the model built by training.build.build_model (per-block torch.compile),
AdamW from training.optim (fused on CUDA), bf16 autocast, one optimizer step per micro-batch, on
random tokens already on the device (the data loader's cost is bench.data_loader's and
bench.trainer_overhead's business). MFU = tokens/s x model.gpt.flops_per_token (6N plus attention,
PaLM's accounting) / the device's dense bf16 peak (training.metrics.PEAK_BF16_FLOPS). The baseline
in the same run is the same model uncompiled, so the record also says what compile buys.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from bench.common import write_result
from model.gpt import flops_per_token
from jobspec import load_spec
from training.distributed import init_distributed
from training.metrics import peak_flops
from training.optim import build_optimizer
from training.build import build_model, model_config, precision
from model.config import size_keys

# GPT-3 paper shapes (125M, 350M, 1.3B) with the GPT-2 vocabulary rounded to 64, as LLM Foundry's table uses:
# model/config.py's named sizes, every key written (jobs/pretrain.yaml's own model keys would win over model.size).
SIZES = {
    "tiny": dict(n_layer=2, n_head=4, d_model=128),
    **{
        name: {k: v for k, v in size_keys(name).items() if k not in ("max_seq_len", "size")}
        for name in ("125m", "350m", "1.3b")
    },
}
MICRO_BATCH = {"tiny": 2, "125m": 16, "350m": 8, "1.3b": 8}


class _RandomTokens:
    vocab_size = 50304
    model_cfg = None


def profile_steps(step, n: int = 3) -> str:
    """The kernels that take the GPU's time over n steps, and how busy it was: what limits the step."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            step()
        torch.cuda.synchronize()
    wall_us = (time.perf_counter() - start) * 1e6
    events = prof.key_averages()
    busy_us = sum(getattr(e, "self_device_time_total", 0) for e in events if e.device_type.name == "CUDA")
    table = events.table(sort_by="self_device_time_total", row_limit=15)
    return f"GPU busy {busy_us / wall_us:.1%} of {wall_us / 1e3 / n:.1f} ms per step (profiler on)\n{table}"


def measure(size: str, seq: int, steps: int, device: str, compile: bool, profile: bool = False) -> dict:
    overrides = [
        f"model.{k}={'null' if v is None else str(v).lower() if isinstance(v, bool) else v}"
        for k, v in SIZES[size].items()
    ] + [
        "model.vocab_size=50304",
        f"model.max_seq_len={seq}",
        f"data.seq_len={seq}",
        f"train.compile={str(compile).lower()}",
        "train.dtype=bf16",
        f"train.device={device}",
    ]
    cfg = load_spec("jobs/pretrain.yaml", overrides)
    dist_info = init_distributed(cfg.parallel, cfg.train.device)
    param_dtype, autocast = precision(cfg, dist_info)
    mcfg = model_config(cfg, _RandomTokens())
    model = build_model(mcfg, cfg, dist_info, param_dtype)
    optimizer = build_optimizer(model, cfg.optim, dist_info.device)
    batch = MICRO_BATCH[size]
    x = torch.randint(0, mcfg.vocab_size, (batch, seq + 1), device=dist_info.device)
    inputs, targets = x[:, :-1].contiguous(), x[:, 1:].contiguous()

    def step() -> float:
        with autocast:
            logits = model(inputs)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()  # the trainer reads the loss every step: the same synchronization

    on_gpu = dist_info.device.type == "cuda"
    for _ in range(3):  # compile, autotune, allocator warm-up
        step()
    if on_gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = time.perf_counter() - start
    tps = steps * batch * seq / seconds
    peak = peak_flops(dist_info.device)
    fpt = flops_per_token(mcfg, seq)
    out = {
        "params": model.num_params(),
        "micro_batch": batch,
        "tokens_per_s": round(tps),
        "tflops": round(tps * fpt / 1e12, 1),
        "mfu": round(tps * fpt / peak, 4) if peak else None,
        "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if on_gpu else None,
    }
    if profile and on_gpu:
        print(f"--- {size} {'compiled' if compile else 'eager'}: where the GPU time goes", flush=True)
        print(profile_steps(step), flush=True)
    model = optimizer = None  # frees the GPU memory before the next size (the closure holds them too)
    if on_gpu:
        torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", nargs="*", default=["125m", "350m", "1.3b"], choices=list(SIZES))
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--no-baseline", action="store_true", help="skip the uncompiled run")
    ap.add_argument("--profile", action="store_true", help="print each compiled size's top GPU kernels and busy share")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    figures = {}
    for size in args.sizes:
        compiled = measure(size, args.seq, args.steps, args.device, compile=True, profile=args.profile)
        figures[size] = compiled
        if not args.no_baseline:
            eager = measure(size, args.seq, args.steps, args.device, compile=False)
            compiled["eager_tokens_per_s"] = eager["tokens_per_s"]
            compiled["compile_ratio"] = round(compiled["tokens_per_s"] / eager["tokens_per_s"], 3)
        mfu = f"{100 * compiled['mfu']:.1f}%" if compiled["mfu"] is not None else "n/a (no known peak)"
        print(
            f"{size}: {compiled['params'] / 1e6:,.0f}M params  {compiled['tokens_per_s']:,} tok/s  MFU {mfu}  "
            f"peak mem {compiled['peak_mem_gib']} GiB  compile x{compiled.get('compile_ratio', '-')}",
            flush=True,
        )
    print("wrote", write_result("gpu_pretrain", vars(args), figures))


if __name__ == "__main__":
    main()
