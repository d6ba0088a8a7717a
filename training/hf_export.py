"""Hugging Face folders: export a run's checkpoint as one (training/hf_import.py reads them).

    export_hf(run_or_checkpoint, out_dir)  -> a folder `AutoModelForCausalLM.from_pretrained` reads: a Llama,
                                              or the Qwen2 / Qwen3 a model imported from one of those stays

The tensor names are model/state_dict_adapter.py's, config.json model/hf_families.py's; what a run folder holds is
training/run_folder.py's. Nothing here needs `transformers`, and nothing unpickles: weights are read and
written as safetensors.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch

from jobspec.contract import checkpoint_step
from model.state_dict_adapter import DTYPE_NAMES, WEIGHTS, HFError, check_shapes, hf_config, to_hf_name
from training import run_folder
from training.run_folder import read_checkpoint_model

EXPORT_MARKER = "orch_export.json"  # written into every export: marks a folder export_hf may replace


# ---------------------------------------------------------------- export


def _tokenizer_files(tokenizer_json: Path, max_len: int) -> tuple[dict, dict, dict[str, dict]]:
    """(special token ids, tokenizer_config.json, other JSON files) for our byte-level BPE."""
    from tokenizers import Tokenizer

    from training.data.tokenizer import EOS, IM_END, IM_START, PAD

    from training.data.special_tokens import CONFIG, SPECIAL_MAP, read_special_tokens

    try:
        tok = Tokenizer.from_file(str(tokenizer_json))
    except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception on bad JSON
        raise HFError(f"{tokenizer_json} is not a Hugging Face tokenizer.json ({e})") from None
    folder = tokenizer_json.parent
    if (folder / CONFIG).is_file() and tok.token_to_id(EOS) is None:  # an imported model's: its own files
        special, _ = read_special_tokens(tok, folder)
        config = {k: v for k, v in json.loads((folder / CONFIG).read_text()).items() if k != "chat_template"}
        files = (
            {SPECIAL_MAP: json.loads((folder / SPECIAL_MAP).read_text())} if (folder / SPECIAL_MAP).is_file() else {}
        )
        ids = {"bos": special.bos, "eos": special.eos, "pad": special.pad, "stops": list(special.stops)}
        return ids, config, files
    eos = tok.token_to_id(EOS)
    if eos is None:
        raise HFError(f"{tokenizer_json} has no {EOS} token, which our models use as BOS and EOS")
    pad = tok.token_to_id(PAD)
    extra = [t for t in (IM_START, IM_END) if tok.token_to_id(t) is not None]
    special = {
        "bos_token": EOS,
        "eos_token": EOS,
        **({"pad_token": PAD} if pad is not None else {}),
        "additional_special_tokens": extra,
    }
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


def _chat_template(tokenizer_json: Path, run_kind: str) -> Optional[str]:
    """The chat template to ship: the tokenizer folder's own (chat_template.jinja or tokenizer_config.json's),
    else ChatML for a post-trained run; None for a pretrained model of ours, which has no chat format."""
    from tokenizers import Tokenizer

    from training.data.special_tokens import EOS, read_special_tokens

    tok = Tokenizer.from_file(str(tokenizer_json))
    _, template = read_special_tokens(tok, tokenizer_json.parent)
    if run_kind == "pretrain" and tok.token_to_id(EOS) is not None:
        return None
    if template is not None:
        return template
    if run_kind != "pretrain":
        from training.posttrain.chat import CHAT_TEMPLATE

        return CHAT_TEMPLATE
    return None


def _is_previous_export(folder: Path) -> bool:
    return (folder / EXPORT_MARKER).is_file()


def export_hf(
    source: str | Path, out_dir: str | Path, *, tokenizer: str | Path | None = None, dtype: torch.dtype = torch.float32
) -> Path:
    """Write a run's newest valid checkpoint (or the given checkpoint folder) as a Hugging Face folder of the
    model's family (model/hf_families.py `family`). Written beside out_dir and renamed into place; replaces only
    an empty folder or an earlier export. Returns out_dir."""
    from safetensors.torch import save_file

    if dtype not in DTYPE_NAMES:
        raise HFError(f"dtype {dtype} can't be exported; use one of {list(DTYPE_NAMES)}")
    out = Path(out_dir).resolve()
    if out.exists() and not out.is_dir():
        raise HFError(f"out_dir {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not _is_previous_export(out):
        raise HFError(
            f"out_dir {out} is not empty and is not an earlier export (no {EXPORT_MARKER}): "
            "refusing to overwrite it; choose another folder or empty it"
        )

    run_dir, ckpt_dir = run_folder.resolve_checkpoint(source)
    run_kind = run_folder.run_config(run_dir).get("kind", "pretrain")
    state = read_checkpoint_model(ckpt_dir)
    if "tok_embeddings.weight" not in state:
        raise HFError(f"{ckpt_dir / 'model'} has no tok_embeddings.weight: not a GPT checkpoint")
    cfg = run_folder.model_config(ckpt_dir)
    if problems := cfg.llama_incompatibilities():
        raise HFError(f"{run_dir / 'config.yaml'}: can't export as a Hugging Face Llama: {'; '.join(problems)}.")
    real_vocab = state["tok_embeddings.weight"].shape[0]
    if cfg.vocab_size != real_vocab:
        raise HFError(
            f"{run_dir}: the run's model has vocab_size {cfg.vocab_size} but the checkpoint's embedding "
            f"has {real_vocab} rows"
        )
    head = state.pop("score.weight", None)  # a classify run: LlamaForSequenceClassification's head
    value_head = state.pop("value_head.weight", None)  # a reward model: the same with one label
    check_shapes(cfg, state, ckpt_dir / "model")

    tok_path = Path(tokenizer) if tokenizer is not None else run_folder.tokenizer_file(ckpt_dir)
    if tok_path.is_dir():
        tok_path = tok_path / "tokenizer.json"
    ids, tokenizer_config, token_files = _tokenizer_files(tok_path, cfg.max_seq_len)
    chat_template = _chat_template(tok_path, run_kind)
    if chat_template is not None:
        # The template spells <|im_start|> / <|im_end|> as text: they must encode as their special ids.
        # (A user's text that contains them then does too: a rare case, unlike every chat turn.)
        tokenizer_config["split_special_tokens"] = False

    tensors = {to_hf_name(k): v.to(dtype).contiguous() for k, v in state.items()}
    config = hf_config(cfg, dtype, ids["bos"], ids["eos"], ids["pad"])
    if head is not None:
        from training.classify.export import classifier_config

        tensors["score.weight"] = head.to(dtype).contiguous()
        causal_lm = config["architectures"][0]
        config.update(classifier_config(run_dir, head.shape[0]))
        config["architectures"] = [causal_lm.replace("ForCausalLM", "ForSequenceClassification")]
    if value_head is not None:
        from training.classify.export import reward_model_config

        tensors["score.weight"] = value_head.to(dtype).contiguous()
        causal_lm = config["architectures"][0]
        config.update(reward_model_config())
        config["architectures"] = [causal_lm.replace("ForCausalLM", "ForSequenceClassification")]
    step = checkpoint_step(ckpt_dir.name)
    generation = {
        "bos_token_id": ids["bos"],
        "eos_token_id": ids["eos"],
        "pad_token_id": ids["pad"],
        "max_length": cfg.max_seq_len,
    }
    if chat_template is not None and ids.get("end_of_turn") is not None:  # a chat reply ends at <|im_end|>
        generation["eos_token_id"] = [ids["eos"], ids["end_of_turn"]]
    if len(ids.get("stops", ())) > 1:  # an imported model's generation_config.json listed several
        generation["eos_token_id"] = ids["stops"]
    files = {
        "config.json": config,
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
        if head is not None:  # training appended the end-of-sequence token to every text: so does this tokenizer
            from training.classify.export import append_eos

            append_eos(tmp / "tokenizer.json", ids["eos"])
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
