"""LoRA: the module (wrapping by our names, frozen base, merge/unmerge, adapters off = the base),
then real training processes: SFT with LoRA on 2 gloo ranks under FSDP2 killed and resumed exactly
from adapter-only checkpoints, a changed base refused on resume, and DPO whose reference is the base."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.config import GPTConfig
from model.gpt import GPT
from model.lora import LoRALinear, adapters_disabled, apply_lora, init_lora_weights, merge_adapters, unmerge_adapters

CFG = GPTConfig(vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, d_model=32, max_seq_len=16)


def tiny_lora(targets=("wq", "wv", "w2"), **kw) -> GPT:
    torch.manual_seed(0)
    model = GPT(CFG)
    model.init_weights(seed=0)
    apply_lora(model, rank=4, alpha=8, target_modules=targets, **kw)
    init_lora_weights(model, seed=1)
    return model


def test_wraps_the_named_projections_and_freezes_the_rest():
    model = tiny_lora()
    wrapped = sorted(n for n, m in model.named_modules() if isinstance(m, LoRALinear))
    assert wrapped == [f"layers.{i}.{p}" for i in range(2) for p in ("attention.wq", "attention.wv", "feed_forward.w2")]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{w}.lora_{ab}.weight" for w in wrapped for ab in "AB"}
    assert model.checkpoint_keys == trainable
    assert set(model.fresh_keys) == trainable, "a base checkpoint lacks exactly the adapters"
    # the base weight keeps its name, so a base checkpoint loads into the wrapped model as it is
    assert "layers.0.attention.wq.weight" in model.state_dict()


def test_starts_as_the_base_and_adapters_off_is_the_base():
    model = tiny_lora()
    tokens = torch.randint(0, 64, (2, 10))
    with adapters_disabled(model):
        base = model(tokens)
    assert torch.equal(model(tokens), base), "B = 0 at the start: the wrapped model is its base"
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.weight.normal_(0, 0.5)
    tuned = model(tokens)
    assert (tuned - base).abs().max() > 1e-2
    with adapters_disabled(model):
        assert torch.equal(model(tokens), base)
    assert torch.equal(model(tokens), tuned), "adapters come back on after the block"


def test_merge_gives_the_same_logits_and_unmerge_restores_the_weights():
    model = tiny_lora()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.weight.normal_(0, 0.5)
    tokens = torch.randint(0, 64, (2, 10))
    before = model(tokens)
    weight = model.layers[0].attention.wq.weight.detach().clone()
    merge_adapters(model)
    assert not torch.equal(model.layers[0].attention.wq.weight, weight)
    assert torch.allclose(model(tokens), before, atol=1e-5)
    unmerge_adapters(model)
    assert torch.allclose(model.layers[0].attention.wq.weight, weight, atol=1e-6)
    assert torch.allclose(model(tokens), before, atol=1e-5)


def test_only_adapters_get_gradients_and_modules_to_save_train_too():
    model = tiny_lora(targets=("wk",), modules_to_save=("norm",))
    model(torch.randint(0, 64, (2, 10))).sum().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {"norm.weight", *(f"layers.{i}.attention.wk.lora_{ab}.weight" for i in range(2) for ab in "AB")}
    assert "norm.weight" in model.checkpoint_keys and "norm.weight" not in model.fresh_keys


@pytest.mark.parametrize("kw, match", [
    ({"target_modules": ["wz"]}, "'wz', which matches no projection"),
    ({"target_modules": ["wq"], "modules_to_save": ["head"]}, "'head', which is no module"),
    ({"target_modules": ["wq"], "rank": 0}, "lora.rank=0"),
])
def test_bad_targets_are_named(kw, match):
    args = {"rank": 4, "alpha": 8, **kw}
    with pytest.raises(ValueError, match=match):
        apply_lora(GPT(CFG), **args)
