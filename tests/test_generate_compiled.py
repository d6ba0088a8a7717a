"""Generation from a model whose blocks and loss head train.compile compiled (model/parallelize.py): every round of
prompts is a new batch, width and cache length, so compiled generation would recompile on each until dynamo's limit.
It runs eagerly instead, and training's compiled graph is still the one in use afterwards."""

from __future__ import annotations

import copy

import torch
import torch._dynamo

from model.config import GPTConfig
from model.generate import generate
from model.parallelize import parallelize
from model.gpt import GPT

ROUNDS = 12


def test_generation_on_compiled_blocks_never_recompiles():
    torch.set_num_threads(1)
    torch._dynamo.reset()
    cfg = GPTConfig(vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, d_model=32, max_seq_len=48, tie_embeddings=False)
    eager = GPT(cfg)
    eager.init_weights(seed=0)
    with torch.no_grad():
        eager.output.weight.mul_(20)  # sharp logits: greedy choices far from ties
    model = parallelize(copy.deepcopy(eager), None, param_dtype=torch.float32, compile=True)
    tokens = torch.randint(0, 97, (2, 17))

    def train_forward():
        model(tokens[:, :-1], targets=tokens[:, 1:]).backward()

    train_forward()  # training's graphs, compiled once
    gen = torch.Generator().manual_seed(0)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for r in range(ROUNDS):  # new batch sizes, prompt lengths, padding and cache lengths each round
            prompts = [
                torch.randint(1, 97, (1 + (r * 7 + i * 3) % 11,), generator=gen).tolist() for i in range(1 + r % 4)
            ]
            use_cache = r % 3 != 2
            got = generate(model, prompts, 4 + r % 5, temperature=0, use_cache=use_cache)
            assert got == generate(eager, prompts, 4 + r % 5, temperature=0, use_cache=use_cache), r
        train_forward()  # and training's graph is still the one in use
