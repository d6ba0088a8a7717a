"""Checks of the post-training sections (lora:, grpo:, classify:), called by jobspec/checks.py's check_values.
`bad(key, why)` builds the SpecError naming where the value came from, the key and the value."""

from __future__ import annotations

import os

from omegaconf import DictConfig

from jobspec.schema import GRPO_LOSS_TYPES as LOSS_TYPES
from jobspec.schema import GRPO_SCALE_REWARDS as SCALE_REWARDS

# The projections LoRA can wrap (model/gpt.py's names); a longer suffix such as layers.0.attention.wq also works.
LORA_PROJECTIONS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


def check_lora(cfg: DictConfig, bad) -> None:
    lora = cfg.lora
    if not lora.enabled:
        return
    if lora.rank < 1:
        raise bad("lora.rank", "but it must be at least 1")
    if lora.alpha <= 0:
        raise bad("lora.alpha", "but it must be positive (the update is scaled by alpha / rank)")
    if not 0.0 <= lora.dropout < 1.0:
        raise bad("lora.dropout", "but it must be in [0, 1)")
    if not lora.target_modules:
        raise bad("lora.target_modules", "but LoRA needs at least one projection to adapt")
    for i, target in enumerate(lora.target_modules):
        if str(target).rsplit(".", 1)[-1] not in LORA_PROJECTIONS:
            raise bad(f"lora.target_modules[{i}]", "which matches no projection of the model (its projections "
                      f"are {', '.join(LORA_PROJECTIONS)}, or a longer name such as layers.0.attention.wq)")
    if cfg.parallel.tp > 1:
        raise bad("parallel.tp", "but LoRA adapters are not tensor-parallel (a column-parallel "
                  "projection would shard its adapter's A along the wrong dimension); use data parallelism "
                  "(parallel.tp=1), which shards base and adapters with FSDP")
    if lora.modules_to_save and cfg.kind in ("dpo", "grpo"):
        raise bad("lora.modules_to_save", f"but a {cfg.kind} job's reference is the base "
                  "model with its adapters off, which a trained module_to_save would change; leave it empty")


def check_grpo(cfg: DictConfig, bad) -> None:
    g = cfg.grpo
    if g.loss_type not in LOSS_TYPES:
        raise bad("grpo.loss_type", f"but it must be one of {', '.join(LOSS_TYPES)}")
    if g.scale_rewards not in SCALE_REWARDS:
        raise bad("grpo.scale_rewards", f"but it must be one of {', '.join(SCALE_REWARDS)}")
    if g.num_iterations < 1:
        raise bad("grpo.num_iterations", "but it must be at least 1 (updates per sampled batch)")
    if g.epsilon_high is not None and g.epsilon_high < 0:
        raise bad("grpo.epsilon_high", "but it must be positive (or null for clip_eps)")


def check_classify(cfg: DictConfig, bad) -> None:
    c = cfg.classify
    if c.class_weights not in ("none", "balanced"):
        raise bad("classify.class_weights", "but it must be none or balanced")
    if c.train_last_blocks is not None and c.train_last_blocks < 0:
        raise bad("classify.train_last_blocks", "but it must be 0 or more (null = every block)")
    if bool(c.train_file) != bool(c.val_file):
        raise bad("classify.train_file" if not c.train_file else "classify.val_file",
                  "but classify.train_file and classify.val_file go together: "
                  "set both, or neither for the demo task")
    for key in ("train_file", "val_file"):
        if c[key] and not os.path.isfile(c[key]):
            raise bad(f"classify.{key}", "but no such file exists")
