"""Checks of the post-training sections (lora:, grpo:, classify:), called by jobspec/checks.py's check_values.
`bad(key, why, *also)` builds the SpecError naming where the value came from (the command line, if it set key
or one of the keys in also), the key and the value."""

from __future__ import annotations

import os

from omegaconf import DictConfig

from jobspec.schema import GRPO_LOSS_TYPES as LOSS_TYPES
from jobspec.schema import GRPO_SCALE_REWARDS as SCALE_REWARDS

# The projections LoRA can wrap (model/gpt.py's names); a longer suffix such as layers.0.attention.wq also works.
LORA_PROJECTIONS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


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
