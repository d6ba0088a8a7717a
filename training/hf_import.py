"""Hugging Face Llama, Qwen2 and Qwen3 folders read as our GPT: the import side of training/hf_export.py.

    load_hf_state_dict(folder)  -> (GPTConfig, our state dict) from any folder of those families
    import_hf(folder)           -> a GPT holding those weights (CPU, float32)

Nothing unpickles: a folder with only .bin / .pt weights is refused with a sentence saying so.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from model.config import GPTConfig
from model.gpt import GPT, rotary_tables
from model.hf_families import family, read_hf_config
from model.state_dict_adapter import IGNORED_HF, WEIGHTS, WEIGHTS_INDEX, HFError, check_shapes, from_hf_name, refuse


def _weight_files(folder: Path) -> list[Path]:
    index = folder / WEIGHTS_INDEX
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError) as e:
            raise HFError(f"{index} is unreadable ({e})") from None
        files = [folder / n for n in names]
        for f in files:
            if not f.is_file():
                raise HFError(f"{f} is missing (listed in {index})")
        return files
    if (folder / WEIGHTS).is_file():
        return [folder / WEIGHTS]
    found = sorted(folder.glob("model-*-of-*.safetensors"))
    if found:
        return found
    pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt*"))
    hint = f" (it holds {pickles[:3]}: pickled weights are not read; convert them to safetensors)" if pickles else ""
    raise HFError(f"{folder} has no {WEIGHTS} or {WEIGHTS_INDEX}{hint}")


def load_hf_state_dict(folder: str | Path) -> tuple[GPTConfig, dict[str, torch.Tensor]]:
    """A Llama, Qwen2 or Qwen3 folder as (GPTConfig, tensors under our names). A tied output head is left
    out of the tensors, as in our checkpoints."""
    from safetensors import safe_open

    folder = Path(folder)
    config_path = folder / "config.json"
    cfg = read_hf_config(folder)

    state: dict[str, torch.Tensor] = {}
    unknown = []
    for f in _weight_files(folder):
        with safe_open(str(f), framework="pt") as sf:
            for name in sf.keys():
                ours = from_hf_name(name)
                if ours is None:
                    if not IGNORED_HF.match(name):
                        unknown.append(name)
                    continue
                state[ours] = sf.get_tensor(name)
    if unknown:
        raise HFError(
            f"{folder} holds tensors a {family(cfg)} of our kind doesn't have: {unknown[:3]}"
            f"{' and more' if len(unknown) > 3 else ''}"
        )
    if cfg.tie_embeddings and "output.weight" in state:
        # Some writers store the tied head anyway: accept it only if it really is the embedding.
        head = state.pop("output.weight")
        if not torch.equal(head, state.get("tok_embeddings.weight", head)):
            refuse(config_path, "tie_word_embeddings", True, "but lm_head.weight differs from the embedding")
    check_shapes(cfg, state, folder)
    return cfg, state


def import_hf(folder: str | Path) -> GPT:
    """A GPT (on the CPU, float32) holding a Llama, Qwen2 or Qwen3 folder's weights."""
    cfg, state = load_hf_state_dict(folder)
    with torch.device("meta"):
        model = GPT(cfg)
    model.to_empty(device="cpu")  # re-ties the output head when tie_embeddings
    cos, sin = rotary_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, cfg.rope_scaling)
    with torch.no_grad():
        model.rope_cos.copy_(cos)
        model.rope_sin.copy_(sin)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - ({"output.weight"} if cfg.tie_embeddings else set()):
        raise HFError(f"{folder}: weights don't fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model
