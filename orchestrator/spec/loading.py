"""Load a job YAML plus `key=value` overrides into a typed, validated OmegaConf config.

Every failure becomes one SpecError paragraph that names the file (or the override),
the key path and the value at fault, so `orch submit` can print it and exit 2.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import fields, is_dataclass
from typing import Iterable, Sequence

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from model.config import MLPS
from orchestrator.spec.schema import KINDS, OPTIMIZERS, SCHEDULES


class SpecError(Exception):
    """A job spec that can't be used. The message is meant for the user, as is."""

    exit_code = 2


def schema_keys(schema, prefix: str = "") -> list[str]:
    """Every dotted key a schema accepts: ['kind', 'model.n_layer', ...]."""
    keys = []
    for f in fields(schema):
        key = f"{prefix}{f.name}"
        default = f.default_factory() if callable(f.default_factory) else f.default  # type: ignore[misc]
        if is_dataclass(default):
            keys += schema_keys(type(default), key + ".")
        else:
            keys.append(key)
    return keys


def _did_you_mean(key: str, candidates: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(candidates), n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""


def _read_yaml(path: str) -> dict:
    if not os.path.exists(path):
        raise SpecError(f"{path}: no such job file.")
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "an unknown place"
        raise SpecError(f"{path}: the YAML is malformed at {where}: {e.problem}. "
                        "Fix the syntax there (indentation, a missing ':' or an unclosed quote or bracket) "
                        "and submit again.") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise SpecError(f"{path}: the file can't be read as YAML ({e}).") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: a job file must be a mapping of keys to values, "
                        f"but its top level is a {type(raw).__name__}.")
    return raw


def _flatten(raw: dict, prefix: str = "") -> dict:
    """{'train': {'max_steps': 5}} -> {'train.max_steps': 5}; lists stay leaves."""
    flat = {}
    for k, v in raw.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            flat.update(_flatten(v, key + "."))
        else:
            flat[key] = v
    return flat


def _check_known(key: str, value, source: str, valid_keys: list[str]) -> None:
    """An unknown key is an error naming it, its value, the nearest valid key and its siblings."""
    sections = {k.rsplit(".", 1)[0] for k in valid_keys if "." in k}
    if key in valid_keys or key in sections:
        return
    parent = key.rsplit(".", 1)[0] if "." in key else ""
    if parent and parent not in sections:
        parent = ""
    siblings = sorted(k[len(parent) + 1:] if parent else k for k in valid_keys
                      if (k.rsplit(".", 1)[0] if "." in k else "") == parent)
    if not parent:
        siblings = sorted(set(siblings) | {s for s in sections if "." not in s})
    where = f"under '{parent}'" if parent else "at the top level"
    raise SpecError(f"{source}: unknown key '{key}' (value {value!r}).{_did_you_mean(key, valid_keys)} "
                    f"Valid keys {where}: {', '.join(siblings)}.")


def _explain(e: OmegaConfBaseException, source: str) -> SpecError:
    """Turn an OmegaConf type or value error into one paragraph naming source, key and value."""
    key = getattr(e, "full_key", None) or "?"
    value = getattr(e, "value", None)
    msg = str(e).splitlines()[0]
    return SpecError(f"{source}: key '{key}' has the value {value!r}, which is not valid: {msg}.")


def load_spec(path: str, overrides: Sequence[str] = ()) -> DictConfig:
    """YAML file + overrides -> typed config (struct mode: unknown keys are errors)."""
    raw = _read_yaml(path)
    kind = raw.get("kind", "pretrain")
    for ov in overrides:
        if ov.startswith("kind="):
            kind = ov.split("=", 1)[1]
    if kind not in KINDS:
        raise SpecError(f"{path}: key 'kind' has the value {kind!r}, which is not a job kind.{_did_you_mean(kind, KINDS)} "
                        f"Known kinds: {', '.join(sorted(KINDS))}.")
    schema = KINDS[kind]
    valid_keys = schema_keys(schema)
    cfg = OmegaConf.structured(schema)
    for key, value in _flatten(raw).items():
        _check_known(key, value, path, valid_keys)
    try:
        cfg = OmegaConf.merge(cfg, OmegaConf.create(raw))
    except OmegaConfBaseException as e:
        raise _explain(e, path) from None
    for ov in overrides:
        if "=" not in ov:
            raise SpecError(f"command line: the override {ov!r} is not of the form key=value "
                            f"(for example train.max_steps=50).")
        source = f"command line override {ov!r}"
        _check_known(ov.split("=", 1)[0].strip(), ov.split("=", 1)[1], source, valid_keys)
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([ov]))
        except OmegaConfBaseException as e:
            raise _explain(e, source) from None
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise SpecError(f"{path}: required key '{missing[0]}' has no value; set it in the file "
                        f"or on the command line ({missing[0]}=...).")
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as e:
        raise _explain(e, path) from None
    check_values(cfg, path)
    return cfg


def check_values(cfg: DictConfig, source: str) -> None:
    """Checks types alone can't express. Each names the key and value at fault."""

    def bad(key: str, value, why: str) -> SpecError:
        return SpecError(f"{source}: key '{key}' has the value {value!r}, {why}.")

    for i, src in enumerate(cfg.data.sources):
        if src != "demo" and "://" not in src and not os.path.exists(src):
            raise bad(f"data.sources[{i}]", src, "but no such file or folder exists "
                      "(give .txt/.jsonl/.parquet files or folders, or 'demo' for the built-in corpus)")
    if cfg.data.tokenizer and not os.path.isfile(cfg.data.tokenizer):
        raise bad("data.tokenizer", cfg.data.tokenizer, "but no such tokenizer.json file exists")
    if cfg.train.max_steps < 0:
        raise bad("train.max_steps", cfg.train.max_steps, "but it must be 0 (only validate and save) or more")
    for key in ("train.micro_batch_size", "train.grad_accum_steps", "data.seq_len",
                "model.n_layer", "model.n_head", "model.d_model", "parallel.tp", "parallel.dp_replicate"):
        value = OmegaConf.select(cfg, key)
        if value is not None and value < 1:
            raise bad(key, value, "but it must be at least 1")
    if cfg.parallel.dp_shard == 0 or cfg.parallel.dp_shard < -1:
        raise bad("parallel.dp_shard", cfg.parallel.dp_shard, "but it must be -1 (the rest) or at least 1")
    if cfg.data.seq_len > cfg.model.max_seq_len:
        raise bad("data.seq_len", cfg.data.seq_len, f"longer than model.max_seq_len={cfg.model.max_seq_len}")
    if cfg.executor not in ("auto", "local", "slurm"):
        raise bad("executor", cfg.executor, "but it must be one of auto, local, slurm")
    if cfg.train.dtype not in ("auto", "fp32", "bf16"):
        raise bad("train.dtype", cfg.train.dtype, "but it must be one of auto, fp32, bf16")
    if not 0.0 <= cfg.data.val_fraction < 1.0:
        raise bad("data.val_fraction", cfg.data.val_fraction, "but it must be in [0, 1)")
    if cfg.model.d_model % cfg.model.n_head:
        raise bad("model.d_model", cfg.model.d_model, f"not divisible by model.n_head={cfg.model.n_head}")
    for key, choices in (("model.mlp", MLPS), ("optim.name", OPTIMIZERS), ("optim.schedule", SCHEDULES)):
        if OmegaConf.select(cfg, key) not in choices:
            raise bad(key, OmegaConf.select(cfg, key), f"but it must be one of {', '.join(choices)}")
    if cfg.model.logit_softcap is not None and cfg.model.logit_softcap <= 0:
        raise bad("model.logit_softcap", cfg.model.logit_softcap, "but it must be positive, or null for no cap")
    if not 0.0 < cfg.optim.decay_fraction <= 1.0:
        raise bad("optim.decay_fraction", cfg.optim.decay_fraction, "but it must be in (0, 1]")
