"""Greedy generation with and without the KV cache: same tokens, and how much faster per token; and
grouped-query attention reading the cached key/value heads in place against copying them every step.

    python -m bench.generate_kv                  # the demo GPT's shape (4M params), 256 new tokens, CPU
    python -m bench.generate_kv --new-tokens 64  # quicker
    python -m bench.generate_kv --threads 1      # on a machine whose cores other processes keep busy

Without the cache every new token reruns the whole sequence; with it, only the new position.
Grouped-query attention: model/gpt.py hands SDPA the cache's kv heads with enable_gqa. The baseline is
what it did before: a copy of every layer's cached keys and values per query head (repeat_interleave) at
every step. Timed per decoding step (the prompt's pass left out), in the demo's shape and in a
long-context one (a 2,048-token prompt, 16 query heads over 4 kv heads, d_model 1024).
Random weights: speed doesn't depend on them, and the exactness checks hold for any weights.
"""

from __future__ import annotations

import argparse
import time
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from bench.common import write_result
from model.config import GPTConfig
from model.generate import generate, stream
from model.gpt import GPT

LONG_CONTEXT = dict(n_layer=4, n_head=16, n_kv_head=4, d_model=1024, prompt_tokens=2048, new_tokens=64)


def timed(model, prompt, new_tokens: int, use_cache: bool) -> tuple[list[int], float]:
    start = time.perf_counter()
    out = generate(model, [prompt], new_tokens, temperature=0, use_cache=use_cache)[0]
    return out, time.perf_counter() - start


def random_model(cfg: GPTConfig) -> GPT:
    model = GPT(cfg)
    model.init_weights(seed=0)
    return model.eval()


def random_prompt(cfg: GPTConfig, n: int) -> list[int]:
    return torch.randint(4, cfg.vocab_size, (n,), generator=torch.Generator().manual_seed(0)).tolist()


@contextmanager
def kv_heads_copied():
    """The baseline: SDPA called as before enable_gqa, on copies of the cached kv heads, one per query head."""
    sdpa = F.scaled_dot_product_attention

    def copying(q, k, v, *args, enable_gqa: bool = False, **kwargs):
        if enable_gqa:
            group = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        return sdpa(q, k, v, *args, **kwargs)

    F.scaled_dot_product_attention = copying  # model/gpt.py looks it up on the module at each call
    try:
        yield
    finally:
        F.scaled_dot_product_attention = sdpa


def cache_speedup(cfg: GPTConfig, prompt_tokens: int, new_tokens: int, repeats: int) -> dict:
    model, prompt = random_model(cfg), random_prompt(cfg, prompt_tokens)
    timed(model, prompt, 8, True)  # warm-up: first-call allocations
    cached, plain = [], []
    for _ in range(repeats):
        tokens_cached, t = timed(model, prompt, new_tokens, True)
        cached.append(t)
        tokens_plain, t = timed(model, prompt, new_tokens, False)
        plain.append(t)
        assert tokens_cached == tokens_plain, "the KV cache changed the greedy tokens"
    n = len(tokens_cached)
    return {
        "new_tokens": n,
        "identical_tokens": tokens_cached == tokens_plain,
        "ms_per_token_cached": 1000 * min(cached) / n,
        "ms_per_token_uncached": 1000 * min(plain) / n,
        "speedup": min(plain) / min(cached),
    }  # per token: bench/run.py reads "speedup"


def decoding(model, prompt, new_tokens: int) -> tuple[list[int], float]:
    """Greedy tokens, and the seconds per token of the steps after the first (the prompt's pass excluded)."""
    tokens = []
    for tok in stream(model, prompt, new_tokens, temperature=0):
        tokens.append(tok)
        if len(tokens) == 1:
            start = time.perf_counter()
    return tokens, (time.perf_counter() - start) / (len(tokens) - 1)


def gqa_in_place_vs_copied(cfg: GPTConfig, prompt_tokens: int, new_tokens: int, repeats: int) -> dict:
    """Cached greedy decoding with the kv heads read in place and copied: ms per decoding step, best of N
    interleaved."""
    model, prompt = random_model(cfg), random_prompt(cfg, prompt_tokens)
    decoding(model, prompt, 4)
    in_place, copied = [], []
    for _ in range(repeats):
        tokens, t = decoding(model, prompt, new_tokens)
        in_place.append(t)
        with kv_heads_copied():
            tokens_copied, t = decoding(model, prompt, new_tokens)
        copied.append(t)
        assert tokens == tokens_copied, "reading the kv heads in place changed the greedy tokens"
    return {
        "ms_per_token_in_place": 1000 * min(in_place),
        "ms_per_token_copied": 1000 * min(copied),
        "ratio": min(copied) / min(in_place),
    }  # how much faster in place


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3, help="best of N for each side")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    # The demo's shape (jobs/pretrain.yaml), with room for prompt + new tokens.
    cfg = GPTConfig(
        vocab_size=4096, n_layer=4, n_head=4, n_kv_head=2, d_model=256, max_seq_len=args.prompt_tokens + args.new_tokens
    )
    figures = cache_speedup(cfg, args.prompt_tokens, args.new_tokens, args.repeats)
    long = {k: v for k, v in LONG_CONTEXT.items() if k not in ("prompt_tokens", "new_tokens")}
    long_cfg = GPTConfig(
        vocab_size=4096, max_seq_len=LONG_CONTEXT["prompt_tokens"] + LONG_CONTEXT["new_tokens"], **long
    )
    for name, shape, prompt_tokens, new_tokens in (
        ("gqa_demo", cfg, args.prompt_tokens, args.new_tokens),
        ("gqa_long", long_cfg, LONG_CONTEXT["prompt_tokens"], LONG_CONTEXT["new_tokens"]),
    ):
        for key, value in gqa_in_place_vs_copied(shape, prompt_tokens, new_tokens, args.repeats).items():
            figures[f"{name}_{key}"] = value
    config = {
        "model": {
            "n_layer": cfg.n_layer,
            "d_model": cfg.d_model,
            "n_head": cfg.n_head,
            "n_kv_head": cfg.n_kv_head,
            "vocab_size": cfg.vocab_size,
            "params": random_model(cfg).num_params(),
        },
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "gqa_long": LONG_CONTEXT,
        "threads": torch.get_num_threads(),
        "device": "cpu",
        "dtype": "float32",
    }
    path = write_result("generate_kv", config, figures)
    print(
        f"{figures['new_tokens']} new tokens: {figures['ms_per_token_cached']:.2f} ms/token with the KV cache, "
        f"{figures['ms_per_token_uncached']:.2f} without: {figures['speedup']:.1f}x, "
        f"identical tokens: {figures['identical_tokens']}\n"
        f"grouped-query attention, kv heads read in place vs copied every step: {figures['gqa_demo_ratio']:.2f}x "
        f"in the demo's shape, {figures['gqa_long_ratio']:.2f}x after a 2,048-token prompt "
        f"({figures['gqa_long_ms_per_token_in_place']:.1f} vs {figures['gqa_long_ms_per_token_copied']:.1f} "
        f"ms/token)\nwrote {path}"
    )


if __name__ == "__main__":
    main()
