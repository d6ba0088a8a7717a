"""Load a job YAML plus `key=value` overrides into a typed, validated OmegaConf config.

Every failure becomes one SpecError paragraph that names the file (or the override),
the key path and the value at fault, so `orch submit` can print it and exit 2.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Iterable, Sequence

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from jobspec.schema import KINDS


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


def did_you_mean(key: str, candidates: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(candidates), n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""


def read_yaml(path: str) -> dict:
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
    sections = {k.rsplit(".", i)[0] for k in valid_keys for i in range(1, k.count(".") + 1)}  # every enclosing one
    if key in valid_keys or key in sections:
        return
    parent = key.rsplit(".", 1)[0] if "." in key else ""
    while parent and parent not in sections:  # the nearest section that exists (curate.filters for a bad filter name)
        parent = parent.rsplit(".", 1)[0] if "." in parent else ""
    under = lambda k: (k.rsplit(".", 1)[0] if "." in k else "") == parent  # noqa: E731
    siblings = sorted({k[len(parent) + 1:] if parent else k for k in [*valid_keys, *sections] if under(k)})
    where = f"under '{parent}'" if parent else "at the top level"
    raise SpecError(f"{source}: unknown key '{key}' (value {value!r}).{did_you_mean(key, valid_keys)} "
                    f"Valid keys {where}: {', '.join(siblings)}.")


def _explain(e: OmegaConfBaseException, source: str) -> SpecError:
    """Turn an OmegaConf type or value error into one paragraph naming source, key and value."""
    key = getattr(e, "full_key", None) or "?"
    value = getattr(e, "value", None)
    msg = str(e).splitlines()[0]
    return SpecError(f"{source}: key '{key}' has the value {value!r}, which is not valid: {msg}.")


def load_spec(path: str, overrides: Sequence[str] = ()) -> DictConfig:
    """YAML file + overrides -> typed config (struct mode: unknown keys are errors)."""
    raw = read_yaml(path)
    kind = raw.get("kind", "pretrain")
    for ov in overrides:
        if ov.startswith("kind="):
            kind = ov.split("=", 1)[1]
    if kind not in KINDS:
        raise SpecError(f"{path}: key 'kind' has the value {kind!r}, which is not a job kind.{did_you_mean(kind, KINDS)} "
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
    if cfg.kind == "data":
        _check_curate(cfg.curate, bad)


REPO = Path(__file__).resolve().parents[1]
NORMALIZATIONS = ("NFC", "NFKC", "NFD", "NFKD", "none")


def _check_curate(c: DictConfig, bad) -> None:
    """The data job's settings (unknown filter names are unknown keys, refused before this)."""
    if c.read.normalization not in NORMALIZATIONS:
        raise bad("curate.read.normalization", c.read.normalization, f"but it must be one of {', '.join(NORMALIZATIONS)}")
    for i, suffix in enumerate(c.read.suffixes):
        if not suffix.startswith(".") or len(suffix) < 2:
            raise bad(f"curate.read.suffixes[{i}]", suffix, "but a suffix starts with a dot, e.g. .py")
    near = c.near_dedup
    if not 0.0 < near.threshold <= 1.0:
        raise bad("curate.near_dedup.threshold", near.threshold, "but a Jaccard threshold must be in (0, 1]")
    if near.unit not in ("word", "token"):
        raise bad("curate.near_dedup.unit", near.unit, "but it must be word or token")
    if near.bands < 1 or near.num_perm < near.bands or near.num_perm % near.bands:
        raise bad("curate.near_dedup.bands", near.bands, f"but it must divide curate.near_dedup.num_perm="
                  f"{near.num_perm} (each band takes num_perm / bands rows of the signature)")
    for key in ("near_dedup.ngram", "decontamination.ngram", "filters.code.max_line_length",
                "filters.code.max_mean_line_length", "filters.gopher_quality.max_words", "filters.c4.max_word_length"):
        if OmegaConf.select(c, key) < 1:
            raise bad(f"curate.{key}", OmegaConf.select(c, key), "but it must be at least 1")
    for key in ("shards", "workers", "report_examples", "filters.code.autogenerated_lines",
                "filters.gopher_quality.min_words", "filters.gopher_quality.min_stop_words",
                "filters.c4.min_words_per_line", "filters.c4.min_sentences", "filters.fineweb.short_line_chars"):
        if OmegaConf.select(c, key) < 0:
            raise bad(f"curate.{key}", OmegaConf.select(c, key), "but it must be 0 or more")
    for key, value in _fractions(c.filters, "curate.filters"):
        if not 0.0 <= value <= 1.0:
            raise bad(key, value, "but a fraction or ratio must be in [0, 1]")
    for i, task in enumerate(c.decontamination.tasks if c.decontamination.enabled else []):
        if not (os.path.isfile(task) or (REPO / task).is_file()):
            raise bad(f"curate.decontamination.tasks[{i}]", task, "but no such task file exists (in the current "
                      "folder or the repository; e.g. jobs/tasks/stdlib_continuation.yaml)")


def _fractions(node: DictConfig, prefix: str):
    """(key, value) of every setting named *fraction*/*ratio* under node, list entries included."""
    for name, value in node.items():
        key = f"{prefix}.{name}"
        if isinstance(value, DictConfig):
            yield from _fractions(value, key)
        elif "fraction" in name or "ratio" in name:
            values = list(value) if OmegaConf.is_list(value) else [value]
            for i, v in enumerate(values):
                yield (f"{key}[{i}]" if OmegaConf.is_list(value) else key), v


def save_config(cfg: DictConfig, path) -> None:
    """Write a resolved config as YAML atomically: a reader sees the old file or the new one, never half of one
    (a crash mid-write would otherwise leave an empty config that loads as the defaults)."""
    from pathlib import Path

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(OmegaConf.to_yaml(cfg))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
