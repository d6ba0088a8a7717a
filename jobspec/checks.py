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

from jobspec.contract import RunFolder, UserError
from jobspec.curate_checks import check_curate
from jobspec.kinds import KINDS
from jobspec.posttrain_checks import check_classify, check_dpo, check_grpo, check_lora
from jobspec.schema import OPTIMIZERS, SCHEDULES, TRACKER_BACKENDS, numeric_keys
from model.config import MLPS

# key (and the keys a check also read) -> where the value at fault came from: "jobs/x.yaml, line 12" or
# "command line override 'k=v'"
Where = Callable[..., str]

# Run ids, folder names and Slurm job names are built from these: a '/', '..' or a newline would leave runs_dir
# or add lines to a batch script. Each ends in \Z and is matched whole (fullmatch): '$' also matches before a
# final newline, which a YAML block scalar (`name: |`) adds.
NAME_CHARS = 100
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,%d}\Z" % (NAME_CHARS - 1))
NAME_RULE = f"letters, digits, '.', '_' or '-', at most {NAME_CHARS} characters"
SLURM_NAME = re.compile(r"[A-Za-z0-9_.,-]+\Z")  # partition, account, qos (comma-separated lists allowed)
SLURM_CONSTRAINT = re.compile(r"[A-Za-z0-9_.,&|\[\]*:()!-]+\Z")  # node features with sbatch's operators
SBATCH_FLAG = re.compile(r"--[A-Za-z][A-Za-z0-9-]*(=[^\x00-\x1f\x7f]*)?\Z")
CONTROL = re.compile(r"[\x00-\x1f\x7f]")
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")  # what `export NAME=...` takes
# pyxis's --container-mounts entry: SRC:DST[:FLAGS], absolute paths (the entries are joined by commas)
CONTAINER_MOUNT = re.compile(r"/[^:,\s]*:/[^:,\s]*(:[A-Za-z+]+)?\Z")
# Variables orch sets itself on the nodes: one in resources.env would be overridden or would break the launch.
ORCH_ENV = {
    "PYTHONPATH": "the code folder orch runs; a resources.setup line may add to it: export PYTHONPATH=$PYTHONPATH:DIR",
    "RANK": "each task's rank",
    "WORLD_SIZE": "the job's process count",
    "LOCAL_RANK": "each task's rank on its node",
    "LOCAL_WORLD_SIZE": "the processes per node",
    "MASTER_ADDR": "the job's first node",
    "MASTER_PORT": "a port per job and restart",
}

# The sbatch options orch writes itself (orchestrator/executors/slurm.py and slurm_array.py, through submitit), and
# what sets each: the same option in resources.sbatch_extra would replace orch's (a pipeline's afterok, the
# warning signal the trainer saves on). sbatch also takes any unambiguous prefix (--dep=singleton is --dependency).
ORCH_SBATCH_OPTIONS = {
    "job-name": "the run id, from name",
    "nodes": "resources.nodes",
    "ntasks-per-node": "resources.nproc_per_node",
    "ntasks": "resources.nodes x resources.nproc_per_node",
    "cpus-per-task": "resources.cpus_per_task",
    "gpus-per-node": "resources.gpus_per_node",
    "mem": "resources.mem_gb",
    "time": "resources.time_min",
    "signal": "resources.time_min: the warning the trainer saves a checkpoint on",
    "partition": "resources.partition",
    "account": "resources.account",
    "qos": "resources.qos",
    "constraint": "resources.constraint",
    "requeue": "resources.max_requeues",
    "no-requeue": "resources.max_requeues",
    "dependency": "a pipeline stage's 'after' key",
    "kill-on-invalid-dep": "a pipeline stage's 'after' key",
    "array": "curate.shards, a data job's tasks",
    "output": "runs_dir: the run folder's slurm/ logs",
    "error": "runs_dir: the run folder's slurm/ logs",
    "open-mode": "none: every start of a job appends to its logs",
}
SBATCH_OWN_PREFIXES = ("gpus",)  # sbatch options of their own that are also prefixes of one above
INT64 = (-(2**63), 2**63 - 1)  # what SQLite and tensors hold


class SpecError(UserError):
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
            raise SpecError(
                f"{where(key)}: key '{key}' has the value {value!r}, which holds a control character "
                "(a newline, a tab, ...): none is allowed in a job's values."
            )


def check_ranges(cfg: DictConfig, bad) -> None:
    """Every numeric key of the job's kind against the Range its schema declares (jobspec/schema.py)."""
    for key, allowed, nullable in numeric_keys(KINDS[cfg.kind]):
        value = OmegaConf.select(cfg, key)
        entries = list(enumerate(value)) if OmegaConf.is_list(value) else [(None, value)]
        for i, v in entries:
            if v is not None and v not in allowed:
                or_null = ", or null" if nullable else ""
                raise bad(
                    key if i is None else f"{key}[{i}]",
                    f"but it must be {allowed}{or_null}" + (f" ({allowed.why})" if allowed.why else ""),
                )


def check_values(cfg: DictConfig, where: Where) -> None:
    """Checks of a job's own values, wherever it runs. A check that reads several keys names them all to
    `where`, which blames the one set on the command line, if any."""

    def bad(key: str, why: str, *also: str) -> SpecError:
        return SpecError(f"{where(key, *also)}: key '{key}' has the value {OmegaConf.select(cfg, key)!r}, {why}.")

    if not NAME.fullmatch(str(cfg.name)):
        raise bad("name", f"but a name must be {NAME_RULE} (it names the run's folder and its Slurm job)")
    check_ranges(cfg, bad)
    if not cfg.data.sources:
        raise bad("data.sources", "but a job reads at least one source ('demo' for the built-in corpus)")
    for i, src in enumerate(cfg.data.sources):
        if src != "demo" and "://" not in src and not os.path.exists(src):
            raise bad(
                f"data.sources[{i}]",
                "but no such file or folder exists "
                "(give .txt/.jsonl/.parquet files or folders, or 'demo' for the built-in corpus)",
            )
    if cfg.data.tokenizer and not os.path.isfile(cfg.data.tokenizer):
        raise bad("data.tokenizer", "but no such tokenizer.json file exists")
    if cfg.parallel.dp_shard == 0:
        raise bad("parallel.dp_shard", "but it must be -1 (the rest) or at least 1")
    if cfg.data.seq_len > cfg.model.max_seq_len:
        raise bad("data.seq_len", f"longer than model.max_seq_len={cfg.model.max_seq_len}", "model.max_seq_len")
    if cfg.executor not in ("auto", "local", "slurm"):
        raise bad("executor", "but it must be one of auto, local, slurm")
    if cfg.train.dtype not in ("auto", "fp32", "bf16"):
        raise bad("train.dtype", "but it must be one of auto, fp32, bf16")
    if cfg.model.d_model % cfg.model.n_head:
        raise bad("model.d_model", f"not divisible by model.n_head={cfg.model.n_head}", "model.n_head")
    if cfg.model.n_kv_head and cfg.model.n_head % cfg.model.n_kv_head:
        raise bad("model.n_kv_head", f"but it must divide model.n_head={cfg.model.n_head}", "model.n_head")
    for key, choices in (("model.mlp", MLPS), ("optim.name", OPTIMIZERS), ("optim.schedule", SCHEDULES)):
        if OmegaConf.select(cfg, key) not in choices:
            raise bad(key, f"but it must be one of {', '.join(choices)}")
    if cfg.resources.code not in ("snapshot", "live"):
        raise bad("resources.code", "but it must be snapshot (the code as submitted) or live (the code as it is)")
    _check_vocab(cfg, bad)
    _check_trackers(cfg, bad)
    _check_slurm_strings(cfg, bad)
    _check_node_environment(cfg, bad, where)
    if cfg.executor == "local":
        refuse_slurm_only(cfg, where)
    _check_reward_model_parallelism(cfg, bad)
    _check_hf_init_from(cfg, bad)
    if cfg.kind == "data":
        check_curate(cfg, bad)
    if "lora" in cfg:
        check_lora(cfg, bad)
    if "grpo" in cfg:
        check_grpo(cfg, bad)
    if "dpo" in cfg:
        check_dpo(cfg, bad)
    if "classify" in cfg:
        check_classify(cfg, bad)


def _check_trackers(cfg: DictConfig, bad) -> None:
    for i, name in enumerate(cfg.logging.backends):
        if name not in TRACKER_BACKENDS:
            raise bad(
                f"logging.backends[{i}]",
                f"but orch writes only to {', '.join(TRACKER_BACKENDS)} (docs/observability.md)",
            )


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
        raise bad(
            "model.vocab_size",
            f"smaller than the tokenizer's {size} tokens ({source}); leave it null to "
            "size the embedding from the tokenizer",
            source.split("=")[0],
        )


def _check_slurm_strings(cfg, bad) -> None:
    """Values that become lines of a batch script: a newline or a stray flag there would run as shell."""
    for key, pattern in (
        ("resources.partition", SLURM_NAME),
        ("resources.account", SLURM_NAME),
        ("resources.qos", SLURM_NAME),
        ("resources.constraint", SLURM_CONSTRAINT),
    ):
        value = OmegaConf.select(cfg, key)
        if value is not None and not pattern.fullmatch(str(value)):
            raise bad(
                key,
                "but it may hold only letters, digits and "
                + ("'_.,-'" if pattern is SLURM_NAME else "sbatch's constraint operators (&|[]*:()!)"),
            )
    for i, flag in enumerate(cfg.resources.sbatch_extra):
        key = f"resources.sbatch_extra[{i}]"
        if not SBATCH_FLAG.fullmatch(str(flag)):
            raise bad(
                key,
                "but each entry must be one long sbatch option, --name or "
                "--name=value (e.g. \"--exclusive\", \"--reservation=r1\")",
            )
        name = str(flag)[2:].split("=", 1)[0]
        if name in SBATCH_OWN_PREFIXES:
            continue
        option = (
            name if name in ORCH_SBATCH_OPTIONS else next((o for o in ORCH_SBATCH_OPTIONS if o.startswith(name)), None)
        )
        if option is not None:
            read_as = "" if name == option else f", which sbatch reads as --{option},"
            raise bad(
                key,
                f"but --{name}{read_as} is an option orch sets itself (key {ORCH_SBATCH_OPTIONS[option]}), "
                "which an entry here would override",
            )


def _check_node_environment(cfg, bad, where: Where) -> None:
    """resources.setup, env, python and container become lines of the batch script (orchestrator/executors/slurm.py):
    each setup line must stay one shell command, each variable a name `export` takes. Control characters are
    refused for every value by check_plain_values."""
    import shlex

    for i, line in enumerate(cfg.resources.setup):
        key, why = f"resources.setup[{i}]", None
        try:
            words = list(shlex.shlex(str(line), posix=True, punctuation_chars=True))
        except ValueError as e:  # "No closing quotation", "No escaped character" (a final backslash)
            why = f"this one is unfinished ({e}): the shell would take the batch script's next line as its rest"
        else:
            if any(w in ("<<", "<<-") for w in words):
                why = "this one starts a here-document, which would read the batch script's next lines as its input"
            elif str(line).lstrip().startswith("#SBATCH"):
                why = "this one is an sbatch option: give those in resources.sbatch_extra or their own resources.* key"
        if why:
            raise bad(key, f"but each entry must be one complete shell command on one line; {why}")
    for name in cfg.resources.env:
        key = f"resources.env.{name}"
        if not ENV_NAME.fullmatch(str(name)):
            raise SpecError(
                f"{where(key, 'resources.env')}: key 'resources.env' has the variable name {str(name)!r}, which is "
                "not a variable name: letters, digits and '_', not starting with a digit."
            )
        if str(name) in ORCH_ENV:
            raise SpecError(
                f"{where(key, 'resources.env')}: key 'resources.env' sets {name}, which orch sets itself on the "
                f"nodes ({ORCH_ENV[str(name)]})."
            )
    if cfg.resources.python is not None and not str(cfg.resources.python).strip():
        raise bad("resources.python", "but it must name an interpreter (a path, or a name on PATH), or be null")
    image = cfg.resources.container.image
    if image is not None and (not str(image).strip() or str(image).startswith("-")):
        raise bad("resources.container.image", "but it must name an image (e.g. nvcr.io#nvidia/pytorch:24.08-py3)")
    for i, mount in enumerate(cfg.resources.container.mounts):
        if not CONTAINER_MOUNT.fullmatch(str(mount)):
            raise bad(
                f"resources.container.mounts[{i}]",
                "but each entry must be SRC:DST or SRC:DST:FLAGS, two absolute paths without ',' ':' or spaces "
                "and pyxis's flags (e.g. /scratch/me:/scratch/me:ro)",
            )
    if cfg.resources.container.mounts and image is None:
        raise bad("resources.container.mounts", "but no resources.container.image is set", "resources.container.image")


def refuse_slurm_only(cfg, where: Where, why: str = "executor: local") -> None:
    """resources.setup and resources.container are made for a cluster's nodes (module load, pyxis's srun): the local
    executor runs with this machine's environment, and refuses them rather than ignoring them."""
    for key, empty in (("resources.setup", "[]"), ("resources.container.image", "null")):
        value = OmegaConf.select(cfg, key)
        if value:
            raise SpecError(
                f"{where(key, 'executor')}: key '{key}' has the value {value!r}, but the local executor ({why}) runs "
                "the trainer in this machine's environment: setup lines and containers are for Slurm's nodes. "
                f"Submit with executor=slurm, or set {key}={empty} to run here."
            )


def _check_hf_init_from(cfg, bad) -> None:
    """A Hugging Face folder to start from: a family or option our GPT lacks (model/hf_families.py) is refused here,
    before anything is queued, not when the trainer reads the folder."""
    init_from = cfg.checkpoint.init_from
    if not init_from or not (Path(init_from) / "config.json").is_file():
        return
    from model.hf_families import read_hf_config  # torch-free; only a job that starts from such a folder needs it

    try:
        read_hf_config(init_from)
    except ValueError as e:
        raise bad("checkpoint.init_from", f"but {str(e).rstrip('.')}") from None


def _check_reward_model_parallelism(cfg, bad) -> None:
    """The reward model's head is not tensor-parallel: an rm job, or GRPO scoring with an rm run, needs tp=1."""
    if cfg.parallel.tp == 1:
        return
    if cfg.kind == "rm":
        raise bad(
            "parallel.tp",
            "but the reward model's head is not tensor-parallel: use parallel.tp=1 (data parallel) for rm jobs",
            "kind",
        )
    if cfg.kind == "grpo" and Path(str(cfg.grpo.reward)).is_dir():
        raise bad(
            "parallel.tp",
            f"but grpo.reward={cfg.grpo.reward!r} is a reward model, whose head is not "
            "tensor-parallel: use parallel.tp=1 with a reward model",
            "grpo.reward",
        )


def check_launch(cfg: DictConfig, where: Where) -> None:
    """What the job asks of the machines, checked before anything is queued (`orch submit`, `orch config`):
    values that would otherwise only fail on the nodes. A trainer started by torchrun takes its world size
    from torchrun instead, and checks it there (training/distributed.py)."""

    def bad(key: str, why: str, *also: str) -> SpecError:
        return SpecError(f"{where(key, *also)}: key '{key}' has the value {OmegaConf.select(cfg, key)!r}, {why}.")

    world = cfg.resources.nodes * cfg.resources.nproc_per_node
    p = cfg.parallel
    shape = f"resources.nodes x resources.nproc_per_node = {world} processes"
    layout = ("resources.nodes", "resources.nproc_per_node", "parallel.dp_replicate", "parallel.tp")
    if world % (p.dp_replicate * p.tp):
        raise bad(
            "parallel.tp",
            f"but parallel.dp_replicate x parallel.tp = {p.dp_replicate * p.tp} does not divide the job's {shape}",
            *layout,
        )
    if p.dp_shard != -1 and p.dp_replicate * p.dp_shard * p.tp != world:
        raise bad(
            "parallel.dp_shard",
            f"but dp_replicate x dp_shard x tp = {p.dp_replicate * p.dp_shard * p.tp} is not the job's {shape}",
            *layout,
        )
    if cfg.resources.nproc_per_node % p.tp:  # a tensor-parallel group's all-reduces cross no node boundary
        raise bad(
            "parallel.tp",
            f"but it must divide resources.nproc_per_node = {cfg.resources.nproc_per_node}, "
            "the GPUs of a node (each tensor-parallel group stays within one node)",
            *layout,
        )
    heads = _model_heads(cfg)
    if heads is not None:
        n_head, n_kv, origin = heads
        for count, what in ((n_head, "attention heads"), (n_kv, "key/value heads")):
            if count % p.tp:
                raise bad(
                    "parallel.tp",
                    f"but it must divide the model's {count} {what} ({origin})",
                    "model.n_head",
                    "model.n_kv_head",
                )


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
