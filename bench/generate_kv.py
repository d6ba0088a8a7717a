"""Greedy generation with and without the KV cache: same tokens, and how much faster per token.

    python -m bench.generate_kv                  # the demo GPT's shape (4M params), 256 new tokens, CPU
    python -m bench.generate_kv --new-tokens 64  # quicker

Without the cache every new token reruns the whole sequence; with it, only the new position.
Random weights: speed doesn't depend on them, and the exactness check holds for any weights.
"""

from __future__ import annotations

import argparse
import time

import torch

from bench.common import write_result
from model.config import GPTConfig
from model.generate import generate
from model.gpt import GPT


def timed(model, prompt, new_tokens: int, use_cache: bool) -> tuple[list[int], float]:
    start = time.perf_counter()
    out = generate(model, [prompt], new_tokens, temperature=0, use_cache=use_cache)[0]
    return out, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3, help="best of N for each side")
    args = p.parse_args()

    # The demo's shape (jobs/pretrain.yaml), with room for prompt + new tokens.
    cfg = GPTConfig(vocab_size=4096, n_layer=4, n_head=4, n_kv_head=2, d_model=256,
                    max_seq_len=args.prompt_tokens + args.new_tokens)
    model = GPT(cfg)
    model.init_weights(seed=0)
    model.eval()
    prompt = torch.randint(4, cfg.vocab_size, (args.prompt_tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    timed(model, prompt, 8, True)  # warm-up: first-call allocations
    cached, plain = [], []
    for _ in range(args.repeats):
        tokens_cached, t = timed(model, prompt, args.new_tokens, True)
        cached.append(t)
        tokens_plain, t = timed(model, prompt, args.new_tokens, False)
        plain.append(t)
        assert tokens_cached == tokens_plain, "the KV cache changed the greedy tokens"
    n = len(tokens_cached)
    figures = {
        "new_tokens": n,
        "identical_tokens": tokens_cached == tokens_plain,
        "ms_per_token_cached": 1000 * min(cached) / n,
        "ms_per_token_uncached": 1000 * min(plain) / n,
        "speedup": min(plain) / min(cached),  # per token: bench/run.py reads "speedup"
    }
    config = {"model": {"n_layer": cfg.n_layer, "d_model": cfg.d_model, "n_head": cfg.n_head,
                        "n_kv_head": cfg.n_kv_head, "vocab_size": cfg.vocab_size, "params": model.num_params()},
              "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "repeats": args.repeats,
              "threads": torch.get_num_threads(), "device": "cpu", "dtype": "float32"}
    path = write_result("generate_kv", config, figures)
    print(f"{n} new tokens: {figures['ms_per_token_cached']:.2f} ms/token with the KV cache, "
          f"{figures['ms_per_token_uncached']:.2f} without: {figures['speedup']:.1f}x, "
          f"identical tokens: {figures['identical_tokens']}\nwrote {path}")


if __name__ == "__main__":
    main()
