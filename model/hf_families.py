"""The Hugging Face families our GPT reads and writes, as config.json <-> GPTConfig, in both directions.

    config_from_hf(config.json's dict, path) -> GPTConfig, or HFError naming the key and value we can't represent
    read_hf_config(folder)                   -> the same from a folder's config.json
    config_json(GPTConfig, dtype name, ...)  -> config.json for the family the config belongs to

Llama (Llama 2, 3, 3.1-3.3 with `rope_scaling` of type llama3, SmolLM2), Qwen2/2.5 (biases on q, k and v) and
Qwen3 (per-head q/k RMSNorm, its own head_dim) share one layout, so each is our GPT with an option or two.
No torch here: `orch submit` reads a checkpoint.init_from folder's config.json through this module before anything
is queued. The tensor names are model/state_dict_adapter.py's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from model.config import ROPE_SCALING_KEYS, GPTConfig, check_rope_scaling

# model_type -> the class transformers builds for it
FAMILIES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
DEFAULT_HEAD_DIM = {"qwen3": 128}  # what transformers assumes when config.json has no head_dim
MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_intermediate_size")


class HFError(ValueError):
    """A folder or checkpoint we can't export or import; the message names the file, key and value."""


def refuse(path: Path, key: str, value, why: str):
    raise HFError(f"{path}: key '{key}' has the value {value!r}: {why}")


def family(cfg: GPTConfig) -> str:
    """The model_type export writes: Qwen3 for per-head q/k norms, Qwen2 for q/k/v biases, else Llama."""
    return "qwen3" if cfg.qk_norm else "qwen2" if cfg.qkv_bias else "llama"


def _rope(hf: dict, path: Path) -> tuple[Optional[float], Optional[dict]]:
    """(rope_theta, GPTConfig.rope_scaling) from `rope_scaling`, or transformers 5's `rope_parameters`."""
    theta = hf.get("rope_theta")
    for key in ("rope_scaling", "rope_parameters"):
        rope = hf.get(key)
        if rope is None:
            continue
        if not isinstance(rope, dict):
            refuse(path, key, rope, "it must be an object (or null)")
        theta = rope.get("rope_theta", theta)
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind == "default":
            continue
        if kind != "llama3":
            refuse(path, key, rope, f"rotary scaling of type {kind!r} is not supported (plain or 'llama3' only)")
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            refuse(path, key, rope, "partial rotary embeddings are not supported")
        scaling = {"rope_type": "llama3", **{k: rope.get(k) for k in ROPE_SCALING_KEYS}}
        try:
            check_rope_scaling(scaling)
        except ValueError as e:
            refuse(path, key, rope, str(e))
        return theta, scaling
    return theta, None


def _sliding_window(hf: dict, path: Path, layers: int) -> None:
    """Refuse sliding-window attention that some layer actually uses (Qwen configs name a window they don't use)."""
    types = hf.get("layer_types")
    if isinstance(types, list) and "sliding_attention" in types:
        refuse(
            path,
            "layer_types",
            types,
            "sliding-window attention is not supported (every layer attends to the whole context)",
        )
    if hf.get("use_sliding_window") and int(hf.get("max_window_layers", layers)) < layers:
        refuse(
            path,
            "use_sliding_window",
            hf["use_sliding_window"],
            "sliding-window attention is not supported "
            f"(max_window_layers={hf.get('max_window_layers')} leaves layers that use it)",
        )


def config_from_hf(hf: dict, path: Path) -> GPTConfig:
    """GPTConfig from a Llama, Qwen2 or Qwen3 config.json, refusing what our GPT can't represent."""
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
        refuse(
            path,
            "model_type",
            model_type,
            f"the families that import are {', '.join(map(repr, FAMILIES))} "
            "(mixture-of-experts variants and other layouts are not supported)",
        )
    for key in MOE_KEYS:
        if hf.get(key):
            refuse(path, key, hf[key], "mixture-of-experts models are not supported (one dense MLP per layer)")
    theta, scaling = _rope(hf, path)
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        refuse(path, "hidden_act", act, "our feed-forward is SwiGLU (silu)")
    if hf.get("mlp_bias", False):
        refuse(path, "mlp_bias", hf["mlp_bias"], "our feed-forward has no biases")
    if hf.get("attention_bias", False):  # Llama's and Qwen3's bias o_proj as well, which ours lacks
        refuse(
            path,
            "attention_bias",
            hf["attention_bias"],
            f"{model_type}'s attention_bias also biases o_proj, which our GPT lacks",
        )
    try:
        d, heads, layers = int(hf["hidden_size"]), int(hf["num_attention_heads"]), int(hf["num_hidden_layers"])
        vocab, inter = int(hf["vocab_size"]), int(hf["intermediate_size"])
    except KeyError as e:
        raise HFError(f"{path} lacks the key {e.args[0]!r}") from None
    _sliding_window(hf, path, layers)
    head_dim = hf.get("head_dim") or DEFAULT_HEAD_DIM.get(model_type)
    if head_dim is None and d % heads:
        refuse(path, "hidden_size", d, f"it is not divisible by num_attention_heads={heads}")
    cfg = GPTConfig(
        vocab_size=vocab,
        n_layer=layers,
        n_head=heads,
        n_kv_head=int(hf.get("num_key_value_heads") or heads),
        d_model=d,
        ffn_hidden=inter,
        max_seq_len=int(hf.get("max_position_embeddings", 2048)),
        rope_theta=float(theta if theta is not None else 10000.0),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_std=float(hf.get("initializer_range", 0.02)),
        qkv_bias=model_type == "qwen2",
        qk_norm=model_type == "qwen3",
        head_size=int(head_dim) if head_dim is not None and int(head_dim) * heads != d else None,
        rope_scaling=scaling,
    )
    try:
        cfg.validate()
    except ValueError as e:
        raise HFError(f"{path}: {e}") from None
    return cfg


def read_hf_config(folder: str | Path) -> GPTConfig:
    """A Hugging Face folder's config.json as a GPTConfig (HFError if it is missing, unreadable or refused)."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise HFError(f"{path} is missing: not a Hugging Face model folder")
    try:
        hf = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise HFError(f"{path} is not readable JSON ({e})") from None
    if not isinstance(hf, dict):
        raise HFError(f"{path} is not a JSON object")
    return config_from_hf(hf, path)


def config_json(
    cfg: GPTConfig, dtype: str = "float32", bos_id: int = 0, eos_id: int = 0, pad_id: Optional[int] = None
) -> dict:
    """config.json for the family of `cfg` (see `family`); dtype is a name: float32, bfloat16, float16."""
    model_type = family(cfg)
    config = {
        "architectures": [FAMILIES[model_type]],
        "model_type": model_type,
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
        "rope_scaling": dict(cfg.rope_scaling) if cfg.rope_scaling is not None else None,
        "attention_dropout": 0.0,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "use_cache": True,
        "torch_dtype": dtype,  # transformers < 4.56 reads this name,
        "dtype": dtype,  # later ones this
    }
    if model_type == "llama":
        config.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    else:  # Qwen's: every layer attends to the whole context
        config.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layer)
    if model_type == "qwen3":
        config["attention_bias"] = False
    return config
