"""What a job gets from a model folder: a run folder, one of its checkpoint folders, or a Hugging Face folder.

The one place that reads them (jobspec/contract.py names the files). Every consumer goes through here:
post-training starting from `checkpoint.init_from`, the eval job, `orch generate|chat|export`.

    resolve_checkpoint(source)  -> (run folder, checkpoint folder): a run's newest valid one, or the one given
    model_config(source)        -> GPTConfig: the run's model.json (written by its trainer), else its config.yaml
                                   with the checkpoint's vocabulary; a Hugging Face folder's config.json
    tokenizer_file(source)      -> the tokenizer.json it was trained with (see the precedence below)
    starting_point(init_from)   -> (GPTConfig, tokenizer.json) for a job that starts from it
    read_checkpoint_model(dir)  -> the full model tensors of a checkpoint, reassembled in one process
    load_model(source)          -> (GPT in eval mode, tokenizer)

Tokenizer precedence, one for every consumer: a Hugging Face folder's own tokenizer.json; a run folder's
tokenizer.json (its trainer copies in the one it trained with); for runs older than that copy, the run's
data.tokenizer if set, else (post-training kinds) its init_from's tokenizer, followed back, else
data.dir/tokenizer.json. Relative paths in a run's config are relative to where the job ran: the current
folder or a parent of the run folder.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, fields
from pathlib import Path
from typing import NamedTuple, Optional

import torch

from jobspec import atomic
from jobspec.contract import RunFolder
from model.config import GPTConfig
from model.gpt import GPT
from training import checkpoint as ckpt

CHAT_KINDS = ("sft", "dpo", "grpo")  # post-training kinds that teach the chat format


class SourceError(ValueError):
    """A folder a job can't start from or read; the message names the folder, file, key and value."""


def is_hf_folder(folder: str | Path) -> bool:
    """True for a folder holding a Hugging Face config.json."""
    return (Path(folder) / "config.json").is_file()


def resolve_checkpoint(source: str | Path) -> tuple[Path, Path]:
    """(run folder, checkpoint folder) for a run folder (its newest valid checkpoint) or a checkpoint folder."""
    src = Path(source).resolve()
    if not src.is_dir():
        raise SourceError(
            f"{source} is not a folder: give a run folder, one of its checkpoints/step_* folders "
            "or a Hugging Face folder"
        )
    if (src / "model").is_dir():
        problem = ckpt.verify(src)
        if problem is not None:
            raise SourceError(f"checkpoint {src} can't be used: {problem}")
        return src.parent.parent, src
    try:
        path = ckpt.find_resumable(src)
    except ckpt.CheckpointError as e:
        raise SourceError(str(e)) from None
    if path is None:
        raise SourceError(
            f"{src} holds no checkpoint ({RunFolder(src).checkpoints} is empty or missing): give a "
            "run folder that has saved one, a checkpoint folder or a Hugging Face folder"
        )
    return src, path


def run_config(run_dir: str | Path) -> dict:
    """A run's config.yaml as plain values; an error if it is missing, empty or unreadable."""
    from omegaconf import OmegaConf

    path = RunFolder(run_dir).config
    if not path.is_file():
        raise SourceError(f"{path} is missing: a run folder's resolved config describes its model and data")
    try:
        cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as e:  # noqa: BLE001 - any YAML/OmegaConf failure is the same problem for the user
        raise SourceError(f"{path} is not a readable job config ({e})") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model"), dict):
        raise SourceError(f"{path} is empty or has no 'model:' section: not a run's config")
    return cfg


def gpt_config(section: dict, where: Path) -> GPTConfig:
    known = {f.name for f in fields(GPTConfig)}
    unknown = sorted(set(section) - known)
    if unknown:
        raise SourceError(
            f"{where}: unknown key 'model.{unknown[0]}' (value {section[unknown[0]]!r}); GPTConfig has {sorted(known)}"
        )
    cfg = GPTConfig(**section)
    try:
        cfg.validate()
    except ValueError as e:
        raise SourceError(f"{where}: {e}") from None
    return cfg


def checkpoint_vocab(ckpt_dir: Path) -> int:
    """Rows of the embedding, read from the checkpoint's metadata (no tensor is loaded)."""
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    from training.lora_checkpoint import base_of

    record = base_of(ckpt_dir)
    if record is not None:  # a LoRA run's checkpoint holds adapters only: the embedding is its base's
        base = Path(record["checkpoint"])
        if is_hf_folder(base):
            return int(json.loads((base / "config.json").read_text())["vocab_size"])
        return checkpoint_vocab(base)
    meta = HuggingFaceStorageReader(str(ckpt_dir / "model")).read_metadata()
    emb = meta.state_dict_metadata.get("tok_embeddings.weight")
    if emb is None:
        raise SourceError(f"{ckpt_dir / 'model'} has no tok_embeddings.weight: not a GPT checkpoint")
    return int(emb.size[0])


def model_config(source: str | Path) -> GPTConfig:
    """The model's shape: a Hugging Face folder's config.json, else the run's model.json, else its config.yaml's
    model section with the checkpoint's vocabulary (a null vocab_size there means the tokenizer's, rounded)."""
    src = Path(source)
    if is_hf_folder(src):
        from model.state_dict_adapter import config_from_hf

        path = src / "config.json"
        try:
            return config_from_hf(json.loads(path.read_text()), path)
        except ValueError as e:
            raise SourceError(str(e)) from None
    run_dir, ckpt_dir = resolve_checkpoint(src)
    folder = RunFolder(run_dir)
    if folder.model.is_file():
        return gpt_config(json.loads(folder.model.read_text()), folder.model)
    section = dict(run_config(run_dir)["model"])
    section["vocab_size"] = checkpoint_vocab(ckpt_dir)
    return gpt_config(section, folder.config)


def _find(name: str | Path, run_dir: Path) -> Optional[Path]:
    """A path from a run's config: absolute, or relative to here or to a parent of the run folder."""
    name = Path(name)
    for base in [Path("/")] if name.is_absolute() else [Path.cwd(), *run_dir.resolve().parents]:
        if (base / name).exists():
            return base / name
    return None


def tokenizer_file(source: str | Path) -> Path:
    """The tokenizer.json a model folder was trained with (the precedence is in this module's docstring)."""
    src = Path(source)
    if is_hf_folder(src):
        if not (src / "tokenizer.json").is_file():
            raise SourceError(f"{src} is a Hugging Face folder without a tokenizer.json")
        return src / "tokenizer.json"
    run_dir, _ = resolve_checkpoint(src)
    if RunFolder(run_dir).tokenizer.is_file():
        return RunFolder(run_dir).tokenizer
    cfg = run_config(run_dir)
    data, init_from = cfg.get("data") or {}, (cfg.get("checkpoint") or {}).get("init_from")
    if data.get("tokenizer"):
        found = _find(data["tokenizer"], run_dir)
        if found is not None:
            return found
    if cfg.get("kind", "pretrain") != "pretrain" and init_from and _find(init_from, run_dir) is not None:
        return tokenizer_file(_find(init_from, run_dir))
    if data.get("dir"):
        found = _find(Path(data["dir"]) / "tokenizer.json", run_dir)
        if found is not None:
            return found
    raise SourceError(
        f"no tokenizer.json for {run_dir}: it has none of its own, and none was found from its "
        f"data.tokenizer={data.get('tokenizer')!r}, checkpoint.init_from={init_from!r} or "
        f"data.dir={data.get('dir')!r}"
    )


class StartingPoint(NamedTuple):
    model_cfg: GPTConfig
    tokenizer: Path  # a tokenizer.json


def starting_point(init_from, tokenizer: Optional[str] = None, key: str = "checkpoint.init_from") -> StartingPoint:
    """(model shape, tokenizer.json) of what a job starts from; `tokenizer` (data.tokenizer) overrides the latter."""
    if not init_from:
        raise SourceError(
            f"key '{key}' is not set: post-training starts from an existing model (a run folder, "
            f"a checkpoint folder or a Hugging Face Llama folder)"
        )
    if not Path(init_from).exists():
        raise SourceError(
            f"key '{key}' has the value {str(init_from)!r}, but no such folder exists (run the "
            "pretraining job first, or point it at a run, checkpoint or Hugging Face folder)"
        )
    if tokenizer and not Path(tokenizer).is_file():
        raise SourceError(f"key 'data.tokenizer' has the value {tokenizer!r}, but no such file exists")
    return StartingPoint(model_config(init_from), Path(tokenizer) if tokenizer else tokenizer_file(init_from))


def read_checkpoint_model(ckpt_dir: str | Path, merge_lora: bool = True) -> dict[str, torch.Tensor]:
    """Full model tensors of a checkpoint, reassembled from every rank's slices, in one process.
    A LoRA checkpoint's are its base's with the adapters merged (merge_lora=False: the adapters as saved)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    folder = str(Path(ckpt_dir) / "model")
    meta = HuggingFaceStorageReader(folder).read_metadata()
    state = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype) for k, m in meta.state_dict_metadata.items()}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, storage_reader=HuggingFaceStorageReader(folder))
    from training.lora_checkpoint import with_base  # a LoRA checkpoint holds only its adapters

    return with_base(ckpt_dir, state, read_checkpoint_model) if merge_lora else state


def load_model(source: str | Path, device: str | torch.device = "cpu", tokenizer: Optional[str | Path] = None):
    """(GPT in eval mode on `device`, tokenizers.Tokenizer) from a run folder (newest valid checkpoint),
    a checkpoint folder, or a Hugging Face Llama folder (`orch export`)."""
    from training.data.tokenizer import load_tokenizer

    src = Path(source)
    if is_hf_folder(src):
        from training.hf_import import import_hf

        model = import_hf(src)
    else:
        _, ckpt_dir = resolve_checkpoint(src)
        cfg = model_config(src)
        state = read_checkpoint_model(ckpt_dir)
        with torch.device("meta"):
            model = GPT(cfg)
        model.to_empty(device="cpu")
        model.init_weights(seed=0)  # only for the rotary tables: every weight is overwritten below
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or set(missing) - ({"output.weight"} if cfg.tie_embeddings else set()):
            raise SourceError(
                f"{ckpt_dir}: weights don't fit the run's model (missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
    tok = load_tokenizer(Path(tokenizer) if tokenizer else tokenizer_file(src))
    return model.to(device).eval(), tok


def is_chat_model(source: str | Path) -> bool:
    """Whether a model answers in the chat format: a run (or a checkpoint of one) of a chat-trained kind,
    or a Hugging Face folder that ships a chat template (`orch export` of such a run does)."""
    src = Path(source)
    if is_hf_folder(src):
        if (src / "chat_template.jinja").is_file():
            return True
        config = src / "tokenizer_config.json"
        return config.is_file() and "chat_template" in json.loads(config.read_text())
    run_dir, _ = resolve_checkpoint(src)
    return run_config(run_dir).get("kind") in CHAT_KINDS


def write_artifacts(run_dir: str | Path, model_cfg: GPTConfig, tokenizer: Path) -> None:
    """The trainer's record of what it trains (rank 0, at start): model.json and a copy of tokenizer.json (with its
    folder's tokenizer_config.json, special_tokens_map.json, generation_config.json, chat_template.jinja), so
    that whoever reads the run later needs no other folder. Atomic writes: a reader never sees half a file."""
    from training.data.special_tokens import FILES

    folder = RunFolder(run_dir)
    # The tokenizer's special tokens and chat template travel with it (training/data/special_tokens.py).
    beside = [(folder.tokenizer.parent / n, Path(tokenizer).parent / n) for n in FILES]
    for path, data in (
        (folder.model, json.dumps(asdict(model_cfg), indent=1).encode()),
        (folder.tokenizer, Path(tokenizer).read_bytes()),
        *((path, source.read_bytes()) for path, source in beside if source.is_file()),
    ):
        if path.is_file() and path.read_bytes() == data:
            continue
        atomic.write_bytes(path, data)
