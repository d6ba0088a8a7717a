"""Checks that types alone can't express, run on every loaded job (`check_values`) and, at submit time, on what
the job asks of the machines (`check_launch`). Each failure is one SpecError naming where the value came from
(file and line, or the command-line override), the key and the value.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Callable, Iterator, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf

from jobspec.contract import RunFolder
from jobspec.curate_checks import check_curate
from jobspec.posttrain_checks import check_classify, check_grpo, check_lora
from jobspec.schema import OPTIMIZERS, SCHEDULES
from model.config import MLPS

Where = Callable[[str], str]  # key -> "jobs/x.yaml, line 12" or "command line override 'k=v'"

# Run ids and folder names are built from these: a '/', '..' or a newline would leave runs_dir or add lines
# to a batch script.
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
SLURM_NAME = re.compile(r"^[A-Za-z0-9_.,-]+$")  # partition, account, qos (comma-separated lists allowed)
SLURM_CONSTRAINT = re.compile(r"^[A-Za-z0-9_.,&|\[\]*:()!-]+$")  # node features with sbatch's operators
SBATCH_FLAG = re.compile(r"^--[A-Za-z][A-Za-z0-9-]*(=[^\x00-\x1f\x7f]*)?$")
CONTROL = re.compile(r"[\x00-\x1f\x7f]")
INT64 = (-(2 ** 63), 2 ** 63 - 1)  # what SQLite and tensors hold


class SpecError(Exception):
    """A job spec that can't be used. The message is meant for the user, as is."""

    exit_code = 2


def _leaves(node, prefix: str = "") -> Iterator[tuple[str, object]]:
    if isinstance(node, (dict, DictConfig)):
        for k, v in node.items():
            yield from _leaves(v, f"{prefix}{k}.")
    elif isinstance(node, (list, ListConfig)):
        for i, v in enumerate(node):
            yield from _leaves(v, f"{prefix[:-1]}[{i}].")
    else:
        yield prefix[:-1], node


def check_plain_values(raw, where: Where) -> None:
    """Every value of a job: integers SQLite and tensors can hold, finite numbers, no control characters."""
    for key, value in _leaves(raw):
        if isinstance(value, bool):
            continue
        if isinstance(value, int) and not INT64[0] <= value <= INT64[1]:
            raise SpecError(f"{where(key)}: key '{key}' has the value {value}, beyond what a 64-bit integer holds.")
        if isinstance(value, float) and not math.isfinite(value):
            raise SpecError(f"{where(key)}: key '{key}' has the value {value}, which is not a finite number.")
        if isinstance(value, str) and CONTROL.search(value):
            raise SpecError(f"{where(key)}: key '{key}' has the value {value!r}, which holds a control character "
                            "(a newline, a tab, ...): none is allowed in a job's values.")


def _at_least(cfg, where: Where, minimum: int, *keys: str) -> None:
    for key in keys:
        value = OmegaConf.select(cfg, key)
        if value is not None and value < minimum:
            raise SpecError(f"{where(key)}: key '{key}' has the value {value!r}, but it must be at least {minimum}.")


def check_values(cfg: DictConfig, where: Where) -> None:
    """Checks of a job's own values, wherever it runs."""

    def bad(key: str, why: str) -> SpecError:
        return SpecError(f"{where(key)}: key '{key}' has the value {OmegaConf.select(cfg, key)!r}, {why}.")

    if not NAME.match(str(cfg.name)):
        raise bad("name", "but a name must be letters, digits, '.', '_' or '-' (it names the run's folder)")
    for i, src in enumerate(cfg.data.sources):
        if src != "demo" and "://" not in src and not os.path.exists(src):
            raise bad(f"data.sources[{i}]", "but no such file or folder exists "
                      "(give .txt/.jsonl/.parquet files or folders, or 'demo' for the built-in corpus)")
    if cfg.data.tokenizer and not os.path.isfile(cfg.data.tokenizer):
        raise bad("data.tokenizer", "but no such tokenizer.json file exists")
    if cfg.train.max_steps < 0:
        raise bad("train.max_steps", "but it must be 0 (only validate and save) or more")
    _at_least(cfg, where, 1, "train.micro_batch_size", "train.grad_accum_steps", "data.seq_len", "model.n_layer",
              "model.n_head", "model.d_model", "parallel.tp", "parallel.dp_replicate", "train.log_every",
              "train.max_nonfinite_steps", "resources.nodes", "resources.nproc_per_node", "resources.cpus_per_task",
              "resources.time_min", "resources.mem_gb", "model.vocab_size", "model.n_kv_head",
              "parallel.collective_timeout_s")
    _at_least(cfg, where, 0, "train.val_every", "train.val_batches", "checkpoint.every", "checkpoint.keep_every",
              "resources.max_retries", "resources.max_requeues", "resources.gpus_per_node", "data.num_workers")
    if cfg.checkpoint.keep_last < 1:
        raise bad("checkpoint.keep_last", "but it must be at least 1: the newest checkpoint is what a resume starts "
                  "from (checkpoint.keep_every keeps older ones too)")
    if cfg.parallel.dp_shard == 0 or cfg.parallel.dp_shard < -1:
        raise bad("parallel.dp_shard", "but it must be -1 (the rest) or at least 1")
    if cfg.data.seq_len > cfg.model.max_seq_len:
        raise bad("data.seq_len", f"longer than model.max_seq_len={cfg.model.max_seq_len}")
    if cfg.executor not in ("auto", "local", "slurm"):
        raise bad("executor", "but it must be one of auto, local, slurm")
    if cfg.train.dtype not in ("auto", "fp32", "bf16"):
        raise bad("train.dtype", "but it must be one of auto, fp32, bf16")
    if not 0.0 <= cfg.data.val_fraction < 1.0:
        raise bad("data.val_fraction", "but it must be in [0, 1)")
    if cfg.model.d_model % cfg.model.n_head:
        raise bad("model.d_model", f"not divisible by model.n_head={cfg.model.n_head}")
    if cfg.model.n_kv_head and cfg.model.n_head % cfg.model.n_kv_head:
        raise bad("model.n_kv_head", f"but it must divide model.n_head={cfg.model.n_head}")
    for key, choices in (("model.mlp", MLPS), ("optim.name", OPTIMIZERS), ("optim.schedule", SCHEDULES)):
        if OmegaConf.select(cfg, key) not in choices:
            raise bad(key, f"but it must be one of {', '.join(choices)}")
    if cfg.model.logit_softcap is not None and cfg.model.logit_softcap <= 0:
        raise bad("model.logit_softcap", "but it must be positive, or null for no cap")
    if not 0.0 < cfg.optim.decay_fraction <= 1.0:
        raise bad("optim.decay_fraction", "but it must be in (0, 1]")
    _check_vocab(cfg, bad)
    _check_slurm_strings(cfg, bad)
    _check_reward_model_parallelism(cfg, bad)
    if cfg.kind == "data":
        check_curate(cfg, bad)
    if "lora" in cfg:
        check_lora(cfg, bad)
    if "grpo" in cfg:
        check_grpo(cfg, bad)
    if "classify" in cfg:
        check_classify(cfg, bad)


def _tokenizer_size(path: str) -> Optional[int]:
    try:
        tok = json.loads(Path(path).read_text())
        ids = list(tok["model"]["vocab"].values()) + [t["id"] for t in tok.get("added_tokens", [])]
        return max(ids) + 1
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # not ours to judge here: the data pipeline says what is wrong with it


def _check_vocab(cfg, bad) -> None:
    """An embedding smaller than the tokenizer fails on the nodes, at the first out-of-range id."""
    if cfg.kind != "pretrain" or cfg.model.vocab_size is None:
        return
    size = _tokenizer_size(cfg.data.tokenizer) if cfg.data.tokenizer else cfg.data.vocab_size
    if size is not None and cfg.model.vocab_size < size:
        source = f"data.tokenizer={cfg.data.tokenizer!r}" if cfg.data.tokenizer else f"data.vocab_size={size}"
        raise bad("model.vocab_size", f"smaller than the tokenizer's {size} tokens ({source}); leave it null to "
                  "size the embedding from the tokenizer")


def _check_slurm_strings(cfg, bad) -> None:
    """Values that become lines of a batch script: a newline or a stray flag there would run as shell."""
    for key, pattern in (("resources.partition", SLURM_NAME), ("resources.account", SLURM_NAME),
                         ("resources.qos", SLURM_NAME), ("resources.constraint", SLURM_CONSTRAINT)):
        value = OmegaConf.select(cfg, key)
        if value is not None and not pattern.match(str(value)):
            raise bad(key, "but it may hold only letters, digits and " +
                      ("'_.,-'" if pattern is SLURM_NAME else "sbatch's constraint operators (&|[]*:()!)"))
    for i, flag in enumerate(cfg.resources.sbatch_extra):
        if not SBATCH_FLAG.match(str(flag)):
            raise bad(f"resources.sbatch_extra[{i}]", "but each entry must be one long sbatch option, --name or "
                      "--name=value (e.g. \"--exclusive\", \"--reservation=r1\")")


def _check_reward_model_parallelism(cfg, bad) -> None:
    """The reward model's head is not tensor-parallel: an rm job, or GRPO scoring with an rm run, needs tp=1."""
    if cfg.parallel.tp == 1:
        return
    if cfg.kind == "rm":
        raise bad("parallel.tp", "but the reward model's head is not tensor-parallel: use parallel.tp=1 "
                  "(data parallel) for rm jobs")
    if cfg.kind == "grpo" and Path(str(cfg.grpo.reward)).is_dir():
        raise bad("parallel.tp", f"but grpo.reward={cfg.grpo.reward!r} is a reward model, whose head is not "
                  "tensor-parallel: use parallel.tp=1 with a reward model")


def check_launch(cfg: DictConfig, where: Where) -> None:
    """What the job asks of the machines, checked before anything is queued (`orch submit`, `orch config`):
    values that would otherwise only fail on the nodes. A trainer started by torchrun takes its world size
    from torchrun instead, and checks it there (training/distributed.py)."""

    def bad(key: str, why: str) -> SpecError:
        return SpecError(f"{where(key)}: key '{key}' has the value {OmegaConf.select(cfg, key)!r}, {why}.")

    world = cfg.resources.nodes * cfg.resources.nproc_per_node
    p = cfg.parallel
    shape = f"resources.nodes x resources.nproc_per_node = {world} processes"
    if world % (p.dp_replicate * p.tp):
        raise bad("parallel.tp", f"but parallel.dp_replicate x parallel.tp = {p.dp_replicate * p.tp} does not divide "
                  f"the job's {shape}")
    if p.dp_shard != -1 and p.dp_replicate * p.dp_shard * p.tp != world:
        raise bad("parallel.dp_shard", f"but dp_replicate x dp_shard x tp = {p.dp_replicate * p.dp_shard * p.tp} is "
                  f"not the job's {shape}")
    heads = _model_heads(cfg)
    if heads is not None:
        n_head, n_kv, origin = heads
        for count, what in ((n_head, "attention heads"), (n_kv, "key/value heads")):
            if count % p.tp:
                raise bad("parallel.tp", f"but it must divide the model's {count} {what} ({origin})")


def _model_heads(cfg) -> Optional[tuple[int, int, str]]:
    """(heads, kv heads, where from): the job's model: section, or for a job that starts from a run, that
    run's model.json when it exists already (a pipeline's later stages are checked when they start)."""
    if cfg.kind == "pretrain":
        return cfg.model.n_head, cfg.model.n_kv_head or cfg.model.n_head, "model.n_head / model.n_kv_head"
    init_from = cfg.checkpoint.init_from
    model_json = RunFolder(init_from).model if init_from else None
    if model_json is None or not model_json.is_file():
        return None
    try:
        model = json.loads(model_json.read_text())
        return model["n_head"], model.get("n_kv_head") or model["n_head"], str(model_json)
    except (OSError, ValueError, KeyError):
        return None
