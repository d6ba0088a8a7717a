"""Pretraining tokens/s, MFU and peak memory on one GPU, for the named model sizes (model/config.py).

    python -m bench.gpu_pretrain                      # 125m, 350m, 1.3b at seq 2048, bf16, compiled, AdamW
    python -m bench.gpu_pretrain --sizes 125m --steps 20 --optim muon
    python -m bench.gpu_pretrain --sizes tiny --device cpu --seq 128 --steps 3   # a smoke run without a GPU

The step is the trainer's own (training.trainer.Trainer.train_step): the model built by training.build
(per-block torch.compile), the optimizer named by --optim (optim.name, stated in each row), the trainer's
chunked loss, clipping and its one read of the loss a step, on random tokens already on the device (the data
loader's cost is bench.data_loader's and bench.trainer_overhead's business). MFU = tokens/s x
model.gpt.flops_per_token (6N plus attention, PaLM's accounting) / the device's dense bf16 peak
(training.metrics.PEAK_BF16_FLOPS). The baseline in the same run is the same model uncompiled, so the record
also says what compile buys. Each size starts from a clean slate (compiled graphs reset, memory collected, the
peak counter reset) and the JSON is rewritten after each size, so a run cut short keeps the sizes it finished.
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
from pathlib import Path

import torch

from bench.common import write_result
from jobspec import load_spec
from model.config import size_keys
from model.gpt import GPT, flops_per_token
from training.distributed import init_distributed
from training.metrics import peak_flops
from training.trainer import Trainer

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


class RandomTokens:
    """A Task (training/tasks/base.py) of random tokens already on the device: the trainer's step without data."""

    vocab_size = 50304
    model_cfg = None
    model_class = GPT
    vocab_parallel_loss = True
    tokenizer_file = None

    def __init__(self, batch: int, seq: int, device: torch.device):
        x = torch.randint(0, self.vocab_size, (batch, seq + 1), device=device)
        self.batch = x[:, :-1].contiguous(), x[:, 1:].contiguous()

    def next_batch(self):
        return self.batch

    def loss(self, model, batch):
        x, y = batch
        return model(x, targets=y), y.numel()  # the pretraining task's loss: chunked, never all the logits

    def tokens_per_batch(self, batch) -> int:
        return batch[1].numel()

    def train_metrics(self) -> dict:
        return {}

    def state_dict(self) -> dict:
        return {}


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


def measure(size: str, seq: int, steps: int, device: str, compile: bool, optim: str, profile: bool = False) -> dict:
    gc.collect()  # the previous size's model, optimizer and compiled graphs: gone before this one's peak
    torch._dynamo.reset()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    overrides = [
        f"model.{k}={'null' if v is None else str(v).lower() if isinstance(v, bool) else v}"
        for k, v in SIZES[size].items()
    ] + [
        "model.vocab_size=50304",
        f"model.max_seq_len={seq}",
        f"data.seq_len={seq}",
        f"train.micro_batch_size={MICRO_BATCH[size]}",
        "train.grad_accum_steps=1",
        f"train.compile={str(compile).lower()}",
        "train.dtype=bf16",
        f"train.device={device}",
        f"optim.name={optim}",
        "logging.backends=[]",
    ]
    cfg = load_spec("jobs/pretrain.yaml", overrides)
    dist_info = init_distributed(cfg.parallel, cfg.train.device)
    batch = MICRO_BATCH[size]
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(cfg, dist_info, Path(run_dir), RandomTokens(batch, seq, dist_info.device))

        def step() -> float:
            loss, _, _ = trainer.train_step()  # its one read of the loss a step: the trainer's synchronization
            trainer.step += 1
            return loss

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
        trainer.close()
    tps = steps * batch * seq / seconds
    peak = peak_flops(dist_info.device)
    fpt = flops_per_token(trainer.model_cfg, seq)
    out = {
        "optim": optim,
        "params": trainer.n_params,
        "micro_batch": batch,
        "tokens_per_s": round(tps),
        "tflops": round(tps * fpt / 1e12, 1),
        "mfu": round(tps * fpt / peak, 4) if peak else None,
        "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if on_gpu else None,
    }
    if profile and on_gpu:
        print(f"--- {size} {'compiled' if compile else 'eager'}: where the GPU time goes", flush=True)
        print(profile_steps(step), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", nargs="*", default=["125m", "350m", "1.3b"], choices=list(SIZES))
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--optim", default="adamw", choices=["adamw", "muon"], help="optim.name for every row")
    ap.add_argument("--no-baseline", action="store_true", help="skip the uncompiled run")
    ap.add_argument("--profile", action="store_true", help="print each compiled size's top GPU kernels and busy share")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    figures = {}
    for size in args.sizes:
        compiled = measure(size, args.seq, args.steps, args.device, True, args.optim, profile=args.profile)
        figures[size] = compiled
        if not args.no_baseline:
            eager = measure(size, args.seq, args.steps, args.device, False, args.optim)
            compiled["eager_tokens_per_s"] = eager["tokens_per_s"]
            compiled["compile_ratio"] = round(compiled["tokens_per_s"] / eager["tokens_per_s"], 3)
        mfu = f"{100 * compiled['mfu']:.1f}%" if compiled["mfu"] is not None else "n/a (no known peak)"
        print(
            f"{size} ({args.optim}): {compiled['params'] / 1e6:,.0f}M params  {compiled['tokens_per_s']:,} tok/s  "
            f"MFU {mfu}  peak mem {compiled['peak_mem_gib']} GiB  compile x{compiled.get('compile_ratio', '-')}",
            flush=True,
        )
        path = write_result("gpu_pretrain", vars(args), figures)  # after each size: a cut-short run keeps it
    print("wrote", path)


if __name__ == "__main__":
    main()
