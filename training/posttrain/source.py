"""What post-training starts from: `checkpoint.init_from` -> the model's shape and its tokenizer.

init_from is one of
    a run folder        (its config.yaml gives the shape; its newest valid checkpoint the weights)
    a checkpoint folder (runs/x/checkpoints/step_00000200)
    a Hugging Face Llama folder (config.json + tokenizer.json)
The tokenizer of a pretraining run is its data.dir/tokenizer.json (or data.tokenizer); a
post-training run has the tokenizer of the run it started from, found by following init_from.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple, Optional

from model.config import GPTConfig


class Source(NamedTuple):
    model_cfg: GPTConfig
    tokenizer: Path  # a tokenizer.json


def resolve_source(init_from, tokenizer: Optional[str] = None, key: str = "checkpoint.init_from") -> Source:
    """(model shape, tokenizer.json) of init_from; `tokenizer` (data.tokenizer) overrides the latter."""
    from model import hf

    source = _resolve(init_from, key, hf)
    if tokenizer:
        if not Path(tokenizer).is_file():
            raise ValueError(f"key 'data.tokenizer' has the value {tokenizer!r}, but no such file exists")
        return Source(source.model_cfg, Path(tokenizer))
    return source


def _resolve(init_from, key: str, hf) -> Source:
    if not init_from:
        raise ValueError(f"key '{key}' is not set: post-training starts from an existing model (a run folder, "
                         f"a checkpoint folder or a Hugging Face Llama folder)")
    path = Path(init_from)
    if not path.exists():
        raise ValueError(f"key '{key}' has the value {str(init_from)!r}, but no such folder exists "
                         f"(run the pretraining job first, or point it at a run, checkpoint or Hugging Face folder)")
    if hf.is_hf_folder(path):
        config_path = path / "config.json"
        cfg = hf.config_from_hf(json.loads(config_path.read_text()), config_path)
        tokenizer = path / "tokenizer.json"
        if not tokenizer.is_file():
            raise ValueError(f"key '{key}' has the value {str(init_from)!r}, a Hugging Face folder without a "
                             f"tokenizer.json: post-training needs the model's tokenizer")
        return Source(cfg, tokenizer)
    run_dir, ckpt_dir = hf._resolve_source(path)
    run_cfg = hf._load_run_config(run_dir)
    section = dict(run_cfg["model"])
    section["vocab_size"] = _checkpoint_vocab(ckpt_dir)  # config.yaml may say null (= the tokenizer's)
    return Source(hf._gpt_config(section, run_dir / "config.yaml"), run_tokenizer(run_cfg, run_dir))


def run_tokenizer(run_cfg: dict, run_dir: Path) -> Path:
    """The tokenizer.json a run trained with: a post-training run's is its source's."""
    from model import hf

    init_from = (run_cfg.get("checkpoint") or {}).get("init_from")
    if run_cfg.get("kind", "pretrain") != "pretrain" and init_from:
        # A relative init_from was relative to where that job ran: here, or above its run folder.
        for base in (Path.cwd(), *run_dir.resolve().parents):
            if (base / init_from).exists():
                return resolve_source(base / init_from).tokenizer
    return hf._find_tokenizer(run_cfg, run_dir)


def _checkpoint_vocab(ckpt_dir: Path) -> int:
    """Rows of the embedding, read from the checkpoint's metadata (no tensor is loaded)."""
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    from training.lora_checkpoint import base_of

    record = base_of(ckpt_dir)
    if record is not None:  # a LoRA run's checkpoint holds adapters only: the embedding is its base's
        base = Path(record["checkpoint"])
        if (base / "config.json").is_file():
            return int(json.loads((base / "config.json").read_text())["vocab_size"])
        return _checkpoint_vocab(base)
    meta = HuggingFaceStorageReader(str(ckpt_dir / "model")).read_metadata()
    emb = meta.state_dict_metadata.get("tok_embeddings.weight")
    if emb is None:
        raise ValueError(f"{ckpt_dir / 'model'} has no tok_embeddings.weight: not a GPT checkpoint")
    return int(emb.size[0])
