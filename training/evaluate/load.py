"""Run folder, checkpoint folder or Hugging Face export -> (GPT in eval mode, tokenizer)."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import Optional

import torch
from omegaconf import OmegaConf

from model.config import GPTConfig
from model.gpt import GPT


class EvalError(ValueError):
    """A checkpoint, task file or eval setting we can't use; the message names the file, key and value."""


def resolve_checkpoint(source: str | Path) -> tuple[Path, Path]:
    """(run folder, checkpoint folder) for a run folder (its newest valid checkpoint) or a checkpoint folder."""
    from training import checkpoint as ckpt

    src = Path(source).resolve()
    if not src.is_dir():
        raise EvalError(f"{source} is not a folder: give a run folder, one of its checkpoints/step_* folders "
                        "or a Hugging Face export")
    if (src / "model").is_dir():
        problem = ckpt.verify(src)
        if problem is not None:
            raise EvalError(f"checkpoint {src} can't be used: {problem}")
        return src.parent.parent, src
    path = ckpt.find_resumable(src)  # raises CheckpointError when checkpoints exist but none is valid
    if path is None:
        raise EvalError(f"{src} holds no checkpoint ({ckpt.checkpoint_root(src)} is empty or missing): give a run "
                        "folder that has saved one, a checkpoint folder or a Hugging Face export")
    return src, path


def _tokenizer_path(run_cfg: dict, run_dir: Path) -> Path:
    data = run_cfg.get("data") or {}
    if run_cfg.get("kind", "pretrain") != "pretrain" and not data.get("tokenizer"):
        # A post-trained model (grpo <- dpo <- sft <- pretrain) has the tokenizer of the run it started from,
        # not the one its own data.dir names: follow checkpoint.init_from back, as post-training does.
        from training.posttrain.source import run_tokenizer

        try:
            return run_tokenizer(run_cfg, run_dir)
        except ValueError as e:  # HFError too
            raise EvalError(f"{run_dir / 'config.yaml'}: no tokenizer.json found by following "
                            f"checkpoint.init_from back to the pretraining run: {e}") from None
    names = [Path(p) for p in (data.get("tokenizer"), data.get("dir") and Path(data["dir"]) / "tokenizer.json") if p]
    tried = []
    for name in names:
        # A relative data.dir is relative to where the job was submitted: here or above the run folder.
        for base in ([Path("/")] if name.is_absolute() else [Path.cwd(), *run_dir.parents]):
            if (base / name).is_file():
                return base / name
            tried.append(str(base / name))
    raise EvalError(f"{run_dir / 'config.yaml'}: no tokenizer.json found from data.tokenizer or data.dir "
                    f"(looked at {tried[:4] or 'nothing: neither key is set'})")


CHAT_KINDS = ("sft", "dpo", "grpo")  # post-training kinds that teach the chat format


def is_chat_model(source: str | Path) -> bool:
    """Whether a model answers in the chat format: a run (or a checkpoint of one) of a chat-trained kind,
    or a Hugging Face folder that ships a chat template (`orch export` of such a run does)."""
    from model.hf import is_hf_folder

    src = Path(source)
    if is_hf_folder(src):
        if (src / "chat_template.jinja").is_file():
            return True
        config = src / "tokenizer_config.json"
        return config.is_file() and "chat_template" in json.loads(config.read_text())
    run_dir, _ = resolve_checkpoint(src)
    config = run_dir / "config.yaml"
    return config.is_file() and OmegaConf.load(config).get("kind") in CHAT_KINDS


def load_model(source: str | Path, device: str | torch.device = "cpu",
               tokenizer: Optional[str | Path] = None):
    """(GPT in eval mode on `device`, tokenizers.Tokenizer) from a run folder (newest valid checkpoint),
    a checkpoint folder, or a Hugging Face Llama folder (`orch export`)."""
    from model.hf import import_hf, is_hf_folder, read_checkpoint_model
    from training.data.tokenizer import load_tokenizer

    src = Path(source)
    if is_hf_folder(src):
        model, tok_path = import_hf(src), src / "tokenizer.json"
    else:
        run_dir, ckpt_dir = resolve_checkpoint(src)
        config = run_dir / "config.yaml"
        if not config.is_file():
            raise EvalError(f"{config} is missing: the run folder's config gives the model's shape")
        run_cfg = OmegaConf.to_container(OmegaConf.load(config), resolve=True)
        state = read_checkpoint_model(ckpt_dir)
        section = dict(run_cfg.get("model") or {})
        known = {f.name for f in fields(GPTConfig)}
        if set(section) - known:
            bad = sorted(set(section) - known)[0]
            raise EvalError(f"{config}: unknown key 'model.{bad}' (value {section[bad]!r})")
        section["vocab_size"] = state["tok_embeddings.weight"].shape[0]  # null in the YAML = the tokenizer's, rounded
        cfg = GPTConfig(**section)
        with torch.device("meta"):
            model = GPT(cfg)
        model.to_empty(device="cpu")
        model.init_weights(seed=0)  # only for the rotary tables: every weight is overwritten below
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or set(missing) - ({"output.weight"} if cfg.tie_embeddings else set()):
            raise EvalError(f"{ckpt_dir}: weights don't fit {config}'s model (missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]})")
        tok_path = _tokenizer_path(run_cfg, run_dir)
    tok = load_tokenizer(Path(tokenizer) if tokenizer else tok_path)
    return model.to(device).eval(), tok
