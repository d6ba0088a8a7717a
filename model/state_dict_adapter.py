"""Our GPT's state dict <-> Hugging Face Llama's, Qwen2's and Qwen3's: tensor names, in both directions.

Our GPT has Llama's layout on purpose (RMSNorm, half-split rotary, SwiGLU, grouped-query attention), so a
conversion is a renaming of weights, with no permutation; Qwen2's q/k/v biases and Qwen3's q/k norms are
tensors of the same names in both. config.json is model/hf_families.py's (no torch there: `orch submit`
reads it). This module knows only the model: files, run folders and tokenizers are training/hf_export.py's.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import torch

from model.config import GPTConfig
from model.gpt import GPT
from model.hf_families import HFError, config_from_hf, config_json, refuse  # noqa: F401 - this module's API too

# Ours -> Hugging Face Llama (Qwen2, Qwen3: the same names); "{}" is the layer index. The one table, read in both
# directions.
NAME_MAP = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "layers.{}.attention_norm.weight": "model.layers.{}.input_layernorm.weight",
    "layers.{}.attention.wq.weight": "model.layers.{}.self_attn.q_proj.weight",
    "layers.{}.attention.wk.weight": "model.layers.{}.self_attn.k_proj.weight",
    "layers.{}.attention.wv.weight": "model.layers.{}.self_attn.v_proj.weight",
    "layers.{}.attention.wq.bias": "model.layers.{}.self_attn.q_proj.bias",  # Qwen2
    "layers.{}.attention.wk.bias": "model.layers.{}.self_attn.k_proj.bias",
    "layers.{}.attention.wv.bias": "model.layers.{}.self_attn.v_proj.bias",
    "layers.{}.attention.q_norm.weight": "model.layers.{}.self_attn.q_norm.weight",  # Qwen3
    "layers.{}.attention.k_norm.weight": "model.layers.{}.self_attn.k_norm.weight",
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


def hf_config(
    cfg: GPTConfig, dtype: torch.dtype = torch.float32, bos_id: int = 0, eos_id: int = 0, pad_id: Optional[int] = None
) -> dict:
    """config.json for the family of `cfg`: LlamaForCausalLM, Qwen2ForCausalLM or Qwen3ForCausalLM."""
    return config_json(cfg, DTYPE_NAMES[dtype], bos_id, eos_id, pad_id)


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
        raise HFError(
            f"{where} {what} (tie_embeddings={cfg.tie_embeddings}): the model config doesn't match the weights"
        )
    for k, shape in expected.items():
        if tuple(state[k].shape) != shape:
            raise HFError(f"{where}: tensor {k!r} has shape {tuple(state[k].shape)}, the model config implies {shape}")
