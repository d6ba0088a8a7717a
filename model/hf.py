"""Hugging Face Llama export and import.

Our GPT has Llama's layout on purpose (RMSNorm, half-split rotary, SwiGLU, grouped-query
attention), so both directions are a renaming of weights, with no permutation:

    export_hf(run_or_checkpoint, out_dir)  -> a folder `LlamaForCausalLM.from_pretrained` reads
    load_hf_state_dict(folder)             -> (GPTConfig, our state dict) from any Llama folder
    import_hf(folder)                      -> a GPT holding those weights

Nothing here needs `transformers`, and nothing unpickles: weights are read and written as safetensors.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from dataclasses import asdict, fields
from pathlib import Path
from typing import Optional

import torch

from model.config import GPTConfig
from model.gpt import GPT, rotary_tables

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

EXPORT_MARKER = "orch_export.json"  # written into every export: marks a folder export_hf may replace
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
# Buffers some older Llama checkpoints carry: derived from the config, not weights.
_IGNORED_HF = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


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


# ---------------------------------------------------------------- reading our checkpoints

def _load_run_config(run_dir: Path) -> dict:
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise HFError(f"{path} is missing: a run folder's resolved config gives the model's shape "
                      "(export a run folder, or a checkpoint folder inside one)")
    from omegaconf import OmegaConf

    try:
        cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as e:  # noqa: BLE001 - any YAML/OmegaConf failure is the same problem for the user
        raise HFError(f"{path} is not a readable job config ({e})") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model"), dict):
        raise HFError(f"{path} has no 'model:' section")
    return cfg


def _gpt_config(section: dict, source: Path) -> GPTConfig:
    known = {f.name for f in fields(GPTConfig)}
    unknown = sorted(set(section) - known)
    if unknown:
        raise HFError(f"{source}: unknown key 'model.{unknown[0]}' (value {section[unknown[0]]!r}); "
                      f"GPTConfig has {sorted(known)}")
    return GPTConfig(**section)


def _resolve_source(source: Path) -> tuple[Path, Path]:
    """(run folder, checkpoint folder) for a run folder or a checkpoint folder."""
    from training import checkpoint as ckpt

    source = source.resolve()
    if not source.is_dir():
        raise HFError(f"{source} is not a folder: give a run folder or one of its checkpoints/step_* folders")
    if (source / "model").is_dir() and (source / ckpt.MANIFEST).exists():
        problem = ckpt.verify(source)
        if problem is not None:
            raise HFError(f"checkpoint {source} can't be exported: {problem}")
        return source.parent.parent, source
    if (source / "model").is_dir():  # a checkpoint folder whose save never finished
        raise HFError(f"checkpoint {source} can't be exported: {source / ckpt.MANIFEST} is missing "
                      "(the save never finished)")
    try:
        path = ckpt.find_resumable(source)
    except ckpt.CheckpointError as e:
        raise HFError(str(e)) from None
    if path is None:
        raise HFError(f"{source} holds no checkpoint ({ckpt.checkpoint_root(source)} is empty or missing): "
                      "give a run folder that has saved one, or a checkpoint folder")
    return source, path


def read_checkpoint_model(ckpt_dir: str | Path) -> dict[str, torch.Tensor]:
    """Full model tensors of a checkpoint, reassembled from every rank's slices, in one process."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    folder = str(Path(ckpt_dir) / "model")
    meta = HuggingFaceStorageReader(folder).read_metadata()
    state = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype)
             for k, m in meta.state_dict_metadata.items()}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, storage_reader=HuggingFaceStorageReader(folder))
    return state


def _check_shapes(cfg: GPTConfig, state: dict, where: Path) -> None:
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


def _find_tokenizer(cfg: dict, run_dir: Path) -> Path:
    data = cfg.get("data") or {}
    names = [Path(data["dir"]) / "tokenizer.json"] if data.get("dir") else []
    if data.get("tokenizer"):
        names.append(Path(data["tokenizer"]))
    tried = []
    for name in names:
        # data.dir may be relative to wherever the job was submitted: here, or a parent of the run folder.
        bases = [Path.cwd(), *run_dir.parents] if not name.is_absolute() else [Path("/")]
        for base in bases:
            p = base / name
            if p.is_file():
                return p
            if str(p) not in tried:
                tried.append(str(p))
    raise HFError(f"no tokenizer.json for {run_dir}: looked for data.dir/tokenizer.json "
                  f"and data.tokenizer at {tried or 'nowhere (neither key is set)'}; "
                  "pass tokenizer=PATH")


# ---------------------------------------------------------------- export

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


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
        "torch_dtype": _DTYPE_NAMES[dtype],  # transformers < 4.56 reads this name,
        "dtype": _DTYPE_NAMES[dtype],  # later ones this
    }


def _tokenizer_files(tokenizer_json: Path, max_len: int) -> tuple[dict, dict, dict[str, dict]]:
    """(special token ids, tokenizer_config.json, other JSON files) for our byte-level BPE."""
    from tokenizers import Tokenizer

    from training.data.tokenizer import EOS, IM_END, IM_START, PAD

    try:
        tok = Tokenizer.from_file(str(tokenizer_json))
    except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception on bad JSON
        raise HFError(f"{tokenizer_json} is not a Hugging Face tokenizer.json ({e})") from None
    eos = tok.token_to_id(EOS)
    if eos is None:
        raise HFError(f"{tokenizer_json} has no {EOS} token, which our models use as BOS and EOS")
    pad = tok.token_to_id(PAD)
    extra = [t for t in (IM_START, IM_END) if tok.token_to_id(t) is not None]
    special = {"bos_token": EOS, "eos_token": EOS, **({"pad_token": PAD} if pad is not None else {}),
               "additional_special_tokens": extra}
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "add_bos_token": False,
        "add_eos_token": False,
        "model_max_length": max_len,
        "clean_up_tokenization_spaces": False,
        # As in training (encode_special_tokens): "<|endoftext|>" inside text is ordinary characters.
        "split_special_tokens": True,
    }
    ids = {"bos": eos, "eos": eos, "pad": pad, "end_of_turn": tok.token_to_id(IM_END)}
    return ids, tokenizer_config, {"special_tokens_map.json": special}


def _chat_template(tokenizer_json: Path, run_cfg: dict) -> Optional[str]:
    """The chat template to ship: chat_template.jinja beside the tokenizer (SFT writes it there), else
    the built-in one for a post-trained run; None for a pretrained model, which has no chat format."""
    beside = tokenizer_json.parent / "chat_template.jinja"
    if beside.is_file():
        return beside.read_text()
    if run_cfg.get("kind", "pretrain") != "pretrain":
        from training.posttrain.chat import CHAT_TEMPLATE

        return CHAT_TEMPLATE
    return None


def _is_previous_export(folder: Path) -> bool:
    return (folder / EXPORT_MARKER).is_file()


def export_hf(source: str | Path, out_dir: str | Path, *, tokenizer: str | Path | None = None,
              dtype: torch.dtype = torch.float32) -> Path:
    """Write a run's newest valid checkpoint (or the given checkpoint folder) as a Hugging Face
    LlamaForCausalLM folder. Written beside out_dir and renamed into place; replaces only an empty
    folder or an earlier export. Returns out_dir."""
    from safetensors.torch import save_file

    if dtype not in _DTYPE_NAMES:
        raise HFError(f"dtype {dtype} can't be exported; use one of {list(_DTYPE_NAMES)}")
    out = Path(out_dir).resolve()
    if out.exists() and not out.is_dir():
        raise HFError(f"out_dir {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not _is_previous_export(out):
        raise HFError(f"out_dir {out} is not empty and is not an earlier export (no {EXPORT_MARKER}): "
                      "refusing to overwrite it; choose another folder or empty it")

    run_dir, ckpt_dir = _resolve_source(Path(source))
    run_cfg = _load_run_config(run_dir)
    state = read_checkpoint_model(ckpt_dir)
    section = dict(run_cfg["model"])
    if "tok_embeddings.weight" not in state:
        raise HFError(f"{ckpt_dir / 'model'} has no tok_embeddings.weight: not a GPT checkpoint")
    real_vocab = state["tok_embeddings.weight"].shape[0]
    if section.get("vocab_size") not in (None, real_vocab):
        raise HFError(f"{run_dir / 'config.yaml'}: model.vocab_size is {section['vocab_size']} but the "
                      f"checkpoint's embedding has {real_vocab} rows")
    section["vocab_size"] = real_vocab
    cfg = _gpt_config(section, run_dir / "config.yaml")
    try:
        cfg.validate()
    except ValueError as e:
        raise HFError(f"{run_dir / 'config.yaml'}: {e}") from None
    if problems := cfg.llama_incompatibilities():
        raise HFError(f"{run_dir / 'config.yaml'}: can't export as a Hugging Face Llama: {'; '.join(problems)}.")
    _check_shapes(cfg, state, ckpt_dir / "model")

    if tokenizer is not None:
        tok_path = Path(tokenizer)
    else:  # a post-training run's tokenizer is the one of the run it started from
        from training.posttrain.source import run_tokenizer

        tok_path = run_tokenizer(run_cfg, run_dir)
    if tok_path.is_dir():
        tok_path = tok_path / "tokenizer.json"
    ids, tokenizer_config, token_files = _tokenizer_files(tok_path, cfg.max_seq_len)
    chat_template = _chat_template(tok_path, run_cfg)
    if chat_template is not None:
        # The template spells <|im_start|> / <|im_end|> as text: they must encode as their special ids.
        # (A user's text that contains them then does too: a rare case, unlike every chat turn.)
        tokenizer_config["split_special_tokens"] = False

    tensors = {to_hf_name(k): v.to(dtype).contiguous() for k, v in state.items()}
    step = int(ckpt_dir.name.split("_")[1]) if ckpt_dir.name.startswith("step_") else None
    generation = {"bos_token_id": ids["bos"], "eos_token_id": ids["eos"], "pad_token_id": ids["pad"],
                  "max_length": cfg.max_seq_len}
    if chat_template is not None and ids.get("end_of_turn") is not None:  # a chat reply ends at <|im_end|>
        generation["eos_token_id"] = [ids["eos"], ids["end_of_turn"]]
    files = {
        "config.json": hf_config(cfg, dtype, ids["bos"], ids["eos"], ids["pad"]),
        "generation_config.json": generation,
        "tokenizer_config.json": tokenizer_config,
        **token_files,
        EXPORT_MARKER: {"source": str(ckpt_dir), "step": step, "model": asdict(cfg)},
    }

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)  # ours: left by an earlier crash of a process with this pid
    tmp.mkdir()
    try:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        shutil.copyfile(tok_path, tmp / "tokenizer.json")
        if chat_template is not None:  # where transformers >= 4.47 reads a tokenizer's chat template
            (tmp / "chat_template.jinja").write_text(chat_template)
        for name, obj in files.items():
            (tmp / name).write_text(json.dumps(obj, indent=2) + "\n")
        if out.is_dir() and any(out.iterdir()):  # an earlier export: swap it out, then drop it
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            try:
                os.replace(tmp, out)
            except OSError:
                os.replace(old, out)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)  # also replaces an empty folder
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# ---------------------------------------------------------------- import

def is_hf_folder(folder: str | Path) -> bool:
    """True for a folder holding a Hugging Face config.json (the kind load_hf_state_dict reads)."""
    return (Path(folder) / "config.json").is_file()


def _refuse(path: Path, key: str, value, why: str):
    raise HFError(f"{path}: key '{key}' has the value {value!r}: {why}")


def config_from_hf(hf: dict, path: Path) -> GPTConfig:
    """GPTConfig from a Llama config.json, refusing what our GPT can't represent."""
    model_type = hf.get("model_type")
    if model_type != "llama":
        _refuse(path, "model_type", model_type, "only Llama-layout models (model_type 'llama') can be imported")
    for key in ("rope_scaling", "rope_parameters"):
        rope = hf.get(key)
        if rope is None:
            continue
        kind = rope.get("rope_type", rope.get("type")) if isinstance(rope, dict) else rope
        if kind != "default":
            _refuse(path, key, rope, "scaled rotary positions are not supported (plain RoPE only)")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key, False):
            _refuse(path, key, hf[key], "our GPT's linear layers have no biases")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        _refuse(path, "hidden_act", act, "our feed-forward is SwiGLU (silu)")
    try:
        d, heads, layers = int(hf["hidden_size"]), int(hf["num_attention_heads"]), int(hf["num_hidden_layers"])
        vocab, inter = int(hf["vocab_size"]), int(hf["intermediate_size"])
    except KeyError as e:
        raise HFError(f"{path} lacks the key {e.args[0]!r}") from None
    if d % heads:
        _refuse(path, "hidden_size", d, f"it is not divisible by num_attention_heads={heads}")
    head_dim = hf.get("head_dim")
    if head_dim is not None and int(head_dim) != d // heads:
        _refuse(path, "head_dim", head_dim, f"our GPT needs hidden_size/num_attention_heads = {d // heads}")
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
    hint = (f" (it holds {pickles[:3]}: pickled weights are not read; convert them to safetensors)"
            if pickles else "")
    raise HFError(f"{folder} has no {WEIGHTS} or {WEIGHTS_INDEX}{hint}")


def load_hf_state_dict(folder: str | Path) -> tuple[GPTConfig, dict[str, torch.Tensor]]:
    """A Llama-layout folder as (GPTConfig, tensors under our names). A tied output head is left
    out of the tensors, as in our checkpoints."""
    from safetensors import safe_open

    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise HFError(f"{config_path} is missing: not a Hugging Face model folder")
    try:
        hf = json.loads(config_path.read_text())
    except ValueError as e:
        raise HFError(f"{config_path} is not JSON ({e})") from None
    cfg = config_from_hf(hf, config_path)

    state: dict[str, torch.Tensor] = {}
    unknown = []
    for f in _weight_files(folder):
        with safe_open(str(f), framework="pt") as sf:
            for name in sf.keys():
                ours = from_hf_name(name)
                if ours is None:
                    if not _IGNORED_HF.match(name):
                        unknown.append(name)
                    continue
                state[ours] = sf.get_tensor(name)
    if unknown:
        raise HFError(f"{folder} holds tensors a Llama of our kind doesn't have: {unknown[:3]}"
                      f"{' and more' if len(unknown) > 3 else ''}")
    if cfg.tie_embeddings and "output.weight" in state:
        # Some writers store the tied head anyway: accept it only if it really is the embedding.
        head = state.pop("output.weight")
        if not torch.equal(head, state.get("tok_embeddings.weight", head)):
            _refuse(config_path, "tie_word_embeddings", True, "but lm_head.weight differs from the embedding")
    _check_shapes(cfg, state, folder)
    return cfg, state


def import_hf(folder: str | Path) -> GPT:
    """A GPT (on the CPU, float32) holding a Llama-layout folder's weights."""
    cfg, state = load_hf_state_dict(folder)
    with torch.device("meta"):
        model = GPT(cfg)
    model.to_empty(device="cpu")  # re-ties the output head when tie_embeddings
    cos, sin = rotary_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
    with torch.no_grad():
        model.rope_cos.copy_(cos)
        model.rope_sin.copy_(sin)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - ({"output.weight"} if cfg.tie_embeddings else set()):
        raise HFError(f"{folder}: weights don't fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model
