"""Checks of the post-training sections (lora:, dpo:, grpo:, classify:), called by jobspec/checks.py's check_values.
`bad(key, why, *also)` builds the SpecError naming where the value came from (the command line, if it set key
or one of the keys in also), the key and the value."""

from __future__ import annotations

import ast
import difflib
import importlib.util
import os
import warnings
from typing import Optional

from omegaconf import DictConfig

from jobspec.schema import DPO_LOSS_TYPES
from jobspec.schema import GRPO_LOSS_TYPES as LOSS_TYPES
from jobspec.schema import GRPO_SCALE_REWARDS as SCALE_REWARDS

# The projections LoRA can wrap (model/gpt.py's names); a longer suffix such as layers.0.attention.wq also works.
LORA_PROJECTIONS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
REWARDS_MODULE = "training.posttrain.rewards"  # where a bare reward name (grpo.rewards[i].fn) is looked up


def check_lora(cfg: DictConfig, bad) -> None:
    lora = cfg.lora
    if not lora.enabled:  # its numbers are checked anyway, against their ranges in jobspec/schema.py
        return
    if not lora.target_modules:
        raise bad("lora.target_modules", "but LoRA needs at least one projection to adapt")
    for i, target in enumerate(lora.target_modules):
        if str(target).rsplit(".", 1)[-1] not in LORA_PROJECTIONS:
            raise bad(
                f"lora.target_modules[{i}]",
                "which matches no projection of the model (its projections "
                f"are {', '.join(LORA_PROJECTIONS)}, or a longer name such as layers.0.attention.wq)",
            )
    if cfg.parallel.tp > 1:
        raise bad(
            "parallel.tp",
            "but LoRA adapters are not tensor-parallel (a column-parallel "
            "projection would shard its adapter's A along the wrong dimension); use data parallelism "
            "(parallel.tp=1), which shards base and adapters with FSDP",
            "lora.enabled",
        )
    if lora.modules_to_save and cfg.kind in ("dpo", "grpo"):
        raise bad(
            "lora.modules_to_save",
            f"but a {cfg.kind} job's reference is the base "
            "model with its adapters off, which a trained module_to_save would change; leave it empty",
        )


def check_grpo(cfg: DictConfig, bad) -> None:
    g = cfg.grpo
    if g.loss_type not in LOSS_TYPES:
        raise bad("grpo.loss_type", f"but it must be one of {', '.join(LOSS_TYPES)}")
    if g.scale_rewards not in SCALE_REWARDS:
        raise bad("grpo.scale_rewards", f"but it must be one of {', '.join(SCALE_REWARDS)}")
    # found without importing it (a reward module may load torch; the control plane never does)
    for i, term in enumerate(g.rewards):
        why = reward_defined(term.fn)
        if why:
            raise bad(f"grpo.rewards[{i}].fn", f"but {why}")
    if g.rewards and sum(t.weight for t in g.rewards) <= 0:
        raise bad(
            "grpo.rewards",
            f"but its weights sum to {sum(t.weight for t in g.rewards):g}: the rewards are a weighted sum, "
            "whose weights must add up to a positive number",
        )
    if not g.rewards and not os.path.isdir(g.reward):
        why = reward_defined(g.reward) if ":" in g.reward else None  # a reward-model run may come later
        if why:
            raise bad("grpo.reward", f"but {why}")


def check_dpo(cfg: DictConfig, bad) -> None:
    d = cfg.dpo
    if d.loss_type not in DPO_LOSS_TYPES:
        raise bad("dpo.loss_type", f"but it must be one of {', '.join(DPO_LOSS_TYPES)}")
    if d.label_smoothing == 0.5:
        raise bad("dpo.label_smoothing", "but at 0.5 a label says nothing (robust's loss divides by 1 - 2 x 0.5)")
    if d.label_smoothing and d.loss_type not in ("sigmoid", "robust"):
        raise bad("dpo.label_smoothing", f"but dpo.loss_type {d.loss_type} has no label smoothing", "dpo.loss_type")
    if d.precompute_ref_log_probs and d.reference_free:
        raise bad("dpo.precompute_ref_log_probs", "but dpo.reference_free has no reference", "dpo.reference_free")


def check_classify(cfg: DictConfig, bad) -> None:
    c = cfg.classify
    if c.class_weights not in ("none", "balanced"):
        raise bad("classify.class_weights", "but it must be none or balanced")
    if bool(c.train_file) != bool(c.val_file):
        raise bad(
            "classify.train_file" if not c.train_file else "classify.val_file",
            "but classify.train_file and classify.val_file go together: set both, or neither for the demo task",
        )
    for key in ("train_file", "val_file"):
        if c[key] and not os.path.isfile(c[key]):
            raise bad(f"classify.{key}", "but no such file exists")


def reward_spec(name: str) -> str:
    """A reward's full `module:function`: a bare name is a function of this module."""
    return name if ":" in name else f"{REWARDS_MODULE}:{name}"


def reward_defined(spec: str) -> Optional[str]:
    """Why `module:function` (or a bare name of this module) can't be a reward, without importing anything
    (the control plane checks it at submit); None when the module's source defines the name at its top level."""
    module_name, _, name = reward_spec(spec).partition(":")
    if not module_name or not name:
        return "it must be 'module:function' or the name of a function of training/posttrain/rewards.py"
    try:
        found = importlib.util.find_spec(module_name)
    except (ImportError, ValueError):
        found = None
    if found is None or not found.origin or not found.origin.endswith(".py"):
        return f"no Python module {module_name!r} can be found" if found is None else None
    with open(found.origin, encoding="utf-8") as f:
        tree = parse_python(f.read())
    if tree is None:
        return None  # its own error shows when it is imported
    names = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
    names |= {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
    names |= {a.asname or a.name for n in tree.body if isinstance(n, ast.ImportFrom) for a in n.names}
    if name in names:
        return None
    near = difflib.get_close_matches(name, sorted(n for n in names if not n.startswith("_")), n=1)
    return f"{module_name} defines no {name!r}" + (f" (did you mean {near[0]!r}?)" if near else "")


def parse_python(source: str) -> Optional[ast.Module]:
    """Python source as a tree, or None when it does not parse (a model's completion, a user's module), quietly:
    no SyntaxWarning printed for what is only being inspected."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return ast.parse(source)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
