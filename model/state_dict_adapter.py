"""Our GPT's state dict <-> Hugging Face Llama's: tensor names and config.json, in both directions.

Our GPT has Llama's layout on purpose (RMSNorm, half-split rotary, SwiGLU, grouped-query attention), so a
conversion is a renaming of weights, with no permutation. This module knows only the model: files, run
folders and tokenizers are training/hf_export.py's business.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import torch

from model.config import GPTConfig
from model.gpt import GPT

# Ours -> Hugging Face Llama; "{}" is the layer index. The one table, read in both directions.
NAME_MAP = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "layers.{}.attention_norm.weight": "model.layers.{}.input_layernorm.weight",
    "layers.{}.attention.wq.weight": "model.layers.{}.self_attn.q_proj.weight",
    "layers.{}.attention.wk.weight": "model.layers.{}.self_attn.k_proj.weight",
    "layers.{}.attention.wv.weight": "model.layers.{}.self_attn.v_proj.weight",
    "layers.{}.attention.wo.weight": "model.layers.{}.self_attn.o_proj.weight",
    "layers.{}.ffn_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "layers.{}.feed_forward.w1.weight": "model.layers.{}.mlp.gate_proj.weight",
    "layers.{}.feed_forward.w3.weight": "model.layers.{}.mlp.up_proj.weight",
    "layers.{}.feed_forward.w2.weight": "model.layers.{}.mlp.down_proj.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

WEIGHTS = "model.safetensors"  # a Hugging Face folder's weights: one file, or shards listed by the index
WEIGHTS_INDEX = "model.safetensors.index.json"
# Buffers some older Llama checkpoints carry: derived from the config, not weights.
IGNORED_HF = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


class HFError(ValueError):
    """A folder or checkpoint we can't export or import; the message names the file, key and value."""


def _compile(direction: str) -> list[tuple[re.Pattern, str]]:
    table = []
    for ours, theirs in NAME_MAP.items():
        src, dst = (ours, theirs) if direction == "to_hf" else (theirs, ours)
        pattern = re.compile(re.escape(src).replace(r"\{\}", r"(\d+)") + r"\Z")
        table.append((pattern, dst))
    return table


_TO_HF, _FROM_HF = _compile("to_hf"), _compile("from_hf")


def _rename(name: str, table) -> Optional[str]:
    for pattern, dst in table:
        m = pattern.match(name)
        if m:
            return dst.replace("{}", m.group(1)) if m.groups() else dst
    return None


def to_hf_name(name: str) -> str:
    out = _rename(name, _TO_HF)
    if out is None:
        raise HFError(f"tensor {name!r} has no Hugging Face Llama name")
    return out


def from_hf_name(name: str) -> Optional[str]:
    """Our name for a Llama tensor name, or None if it isn't one we know."""
    return _rename(name, _FROM_HF)


DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def hf_config(cfg: GPTConfig, dtype: torch.dtype = torch.float32, bos_id: int = 0, eos_id: int = 0,
              pad_id: Optional[int] = None) -> dict:
    """config.json for LlamaForCausalLM."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.hidden_dim,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "initializer_range": cfg.init_std,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "use_cache": True,
        "torch_dtype": DTYPE_NAMES[dtype],  # transformers < 4.56 reads this name,
        "dtype": DTYPE_NAMES[dtype],  # later ones this
    }


def check_shapes(cfg: GPTConfig, state: dict, where: Path) -> None:
    """Every tensor the config implies is in the state dict with its shape, and nothing else."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in GPT(cfg).state_dict().items()}
    if cfg.tie_embeddings:
        expected.pop("output.weight")
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        what = f"lacks {missing[:3]}" if missing else f"has tensors the config doesn't ({extra[:3]})"
        raise HFError(f"{where} {what} (tie_embeddings={cfg.tie_embeddings}): the model config doesn't "
                      "match the weights")
    for k, shape in expected.items():
        if tuple(state[k].shape) != shape:
            raise HFError(f"{where}: tensor {k!r} has shape {tuple(state[k].shape)}, the model config "
                          f"implies {shape}")


def refuse(path: Path, key: str, value, why: str):
    raise HFError(f"{path}: key '{key}' has the value {value!r}: {why}")


def config_from_hf(hf: dict, path: Path) -> GPTConfig:
    """GPTConfig from a Llama config.json, refusing what our GPT can't represent."""
    model_type = hf.get("model_type")
    if model_type != "llama":
        refuse(path, "model_type", model_type, "only Llama-layout models (model_type 'llama') can be imported")
    for key in ("rope_scaling", "rope_parameters"):
        rope = hf.get(key)
        if rope is None:
            continue
        kind = rope.get("rope_type", rope.get("type")) if isinstance(rope, dict) else rope
        if kind != "default":
            refuse(path, key, rope, "scaled rotary positions are not supported (plain RoPE only)")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key, False):
            refuse(path, key, hf[key], "our GPT's linear layers have no biases")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        refuse(path, "hidden_act", act, "our feed-forward is SwiGLU (silu)")
    try:
        d, heads, layers = int(hf["hidden_size"]), int(hf["num_attention_heads"]), int(hf["num_hidden_layers"])
        vocab, inter = int(hf["vocab_size"]), int(hf["intermediate_size"])
    except KeyError as e:
        raise HFError(f"{path} lacks the key {e.args[0]!r}") from None
    if d % heads:
        refuse(path, "hidden_size", d, f"it is not divisible by num_attention_heads={heads}")
    head_dim = hf.get("head_dim")
    if head_dim is not None and int(head_dim) != d // heads:
        refuse(path, "head_dim", head_dim, f"our GPT needs hidden_size/num_attention_heads = {d // heads}")
    rope_theta = hf.get("rope_theta")
    if rope_theta is None and isinstance(hf.get("rope_parameters"), dict):
        rope_theta = hf["rope_parameters"].get("rope_theta")
    cfg = GPTConfig(
        vocab_size=vocab, n_layer=layers, n_head=heads,
        n_kv_head=int(hf.get("num_key_value_heads") or heads), d_model=d, ffn_hidden=inter,
        max_seq_len=int(hf.get("max_position_embeddings", 2048)),
        rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_std=float(hf.get("initializer_range", 0.02)),
    )
    try:
        cfg.validate()
    except ValueError as e:
        raise HFError(f"{path}: {e}") from None
    return cfg
