"""TRL's names for keys that mean what orch's mean (GRPOConfig, DPOConfig, peft's LoraConfig), read as orch's with a
note, so a TRL user's config keys work unchanged (docs/posttrain.md has the table)."""

from __future__ import annotations

import sys
from typing import Sequence

from jobspec.checks import SpecError

# TRL's names of keys that mean what ours mean (GRPOConfig, DPOConfig, peft's LoraConfig): accepted, with a note.
TRL_ALIASES = {
    "grpo.num_generations": "grpo.group_size",
    "grpo.max_completion_length": "grpo.max_new_tokens",
    "grpo.beta": "grpo.kl_coef",
    "grpo.epsilon": "grpo.clip_eps",
    "lora.r": "lora.rank",
    "lora.lora_alpha": "lora.alpha",
    "lora.lora_dropout": "lora.dropout",
}


def apply_aliases(raw: dict, overrides: Sequence[str], lines: dict, path: str) -> tuple[dict, list[str]]:
    """The job with TRL's names (TRL_ALIASES) read as ours, a note on stderr for each; a key given under both
    names is an error naming both. lines (key -> its line in the file) gets the new names too."""
    given = {}  # our name -> where its alias came from
    for alias, ours in TRL_ALIASES.items():
        section, _, name = alias.partition(".")
        node = raw.get(section)
        if isinstance(node, dict) and name in node:
            if ours.partition(".")[2] in node:
                raise SpecError(
                    f"{path}, line {lines.get(alias, '?')}: key '{alias}' (TRL's name for '{ours}') and '{ours}' "
                    "are both set; keep one."
                )
            node[ours.partition(".")[2]] = node.pop(name)
            if alias in lines:
                lines[ours] = lines[alias]
            given[ours] = alias
    rewritten = []
    for ov in overrides:
        key, eq, value = ov.partition("=")
        ours = TRL_ALIASES.get(key.strip())
        if ours and eq:
            given[ours] = key.strip()
            ov = f"{ours}={value}"
        rewritten.append(ov)
    for ours, alias in given.items():
        print(f"note: {alias} is TRL's name for {ours}; read as {ours} (docs/posttrain.md)", file=sys.stderr)
    return raw, rewritten
