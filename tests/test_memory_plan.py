"""bench/memory_plan.py's arithmetic, checked where a CPU can check it: each size's parameter count against a
meta-device build of the model, and the bytes a block saves for its backward against what autograd saves.
(tests/gpu/test_memory_plan.py compares whole peaks with a GPU's allocator.)"""

from __future__ import annotations

import pytest
import torch

from bench.memory_plan import SIZES, layer_activations, meta_parameter_count, parameters, plan
from model.config import GPTConfig
from model.gpt import GPT


@pytest.mark.parametrize("name", list(SIZES))
def test_parameter_counts_are_those_of_a_meta_device_build(name):
    assert parameters(SIZES[name]).total == meta_parameter_count(SIZES[name])


def test_the_7b_is_llama_2_7bs_size():
    assert parameters(SIZES["7b"]).total == 6_738_415_616  # Llama-2-7B's published count


def saved_by_attention_and_mlp(model: GPT, dtype: torch.dtype, autocast: bool) -> tuple[float, int]:
    """Bytes per token that a block's attention and MLP save for the backward, each tensor counted once however
    many ops save it, and the bytes of weight copies among them (autocast's bf16 casts). Their inputs are two
    distinct non-leaf tensors, as in the model."""
    batch, seq = 3, 20  # 60 rows: no weight has that shape, so copies of weights are told apart by their shape
    params = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    weight_shapes = {
        shape
        for m in model.modules()
        if isinstance(m, torch.nn.Linear)  # as saved: transposed
        for shape in (tuple(m.weight.shape), tuple(m.weight.shape)[::-1])
    }
    saved: dict[int, tuple[int, bool]] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            saved[ptr] = (t.untyped_storage().nbytes(), tuple(t.shape) in weight_shapes)
        return t

    base = torch.randn(batch, seq, model.cfg.d_model, requires_grad=True)
    block = model.layers[0]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        first, second = (base * 1).to(dtype), (base * 2).to(dtype)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            block.attention(first, model.rope_cos[:seq], model.rope_sin[:seq])
            block.feed_forward(second)
    weights = sum(n for n, is_weight in saved.values() if is_weight)
    return (sum(n for n, _ in saved.values()) - weights) / (batch * seq), weights


@pytest.mark.parametrize("fsdp", [True, False])
def test_a_blocks_saved_activations_are_the_plans(fsdp):
    """fsdp: a bf16 model (FSDP's parameter dtype); otherwise fp32 weights under bf16 autocast, whose bf16 copies
    of the weights are the plan's compute_weights, not activations."""
    cfg = GPTConfig(vocab_size=256, n_layer=1, n_head=4, n_kv_head=2, d_model=64, max_seq_len=32)
    model = GPT(cfg)
    model.init_weights(seed=0)
    if fsdp:
        model = model.to(torch.bfloat16)
    activations, weight_copies = saved_by_attention_and_mlp(
        model, torch.bfloat16 if fsdp else torch.float32, autocast=not fsdp
    )
    terms = layer_activations(cfg, tp=1, fsdp=fsdp)
    assert activations == terms["linear_inputs"] + terms["attention_and_mlp"]
    if not fsdp:
        assert weight_copies == 2 * (parameters(cfg).block - 2 * cfg.d_model)  # every matmul weight, in bf16


def test_sharding_divides_the_state_and_tensor_parallelism_the_activations():
    cfg = SIZES["1.3b"]
    one, dp8, dp8_tp2 = plan(cfg, 2048, 1, 1), plan(cfg, 2048, 8, 1), plan(cfg, 2048, 8, 2)
    n = parameters(cfg).total
    assert one["weights"] + one["adamw"] + one["grads"] == 16 * n
    assert dp8["adamw"] == 8 * n / 8 and dp8_tp2["adamw"] == 8 * n / 16
    assert dp8_tp2["activations"] < dp8["activations"] and dp8_tp2["logits"] == dp8["logits"] / 2
    checkpointed = plan(cfg, 8192, 8, 1, activation_checkpointing=True)
    assert checkpointed["activations"] < plan(cfg, 8192, 8, 1)["activations"] / 5
    assert plan(SIZES["125m"], 2048, 8, 8) is None  # 12 heads: tp=8 can't split them
