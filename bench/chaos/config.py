"""The tiny job every fault runs: 2 ranks of a ~0.2M-parameter GPT on the CPU, 24 steps, a checkpoint every 4,
AdamW with a cosine schedule, eager, in fp32, with no time budget (RECIPE pins what jobs/pretrain.yaml would
otherwise lend it: Muon, torch.compile, a budget-fitted schedule that depends on the machine's speed).

Its keys fall in two groups: those that change the numbers a run computes (model, data, optimizer, steps, the
seed, a non-finite step) and those that must not (where and how checkpoints are written, the executor, the
resources, timeouts). A reference run is keyed by the first group only, so one uninterrupted run serves every
fault that differs from it in the second, e.g. keep_last 1 or 2, sync or async saves, local or Slurm.
"""

from __future__ import annotations

import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
JOB = REPO / "jobs" / "pretrain.yaml"

MAX_STEPS = 24
EVERY = 4  # checkpoint.every
VAL_EVERY = 8
SHARDS_PER_SAVE = 8  # safetensors files one rank writes per save: 4 for the model, 4 for AdamW's moments

DATA = [
    "data.seq_len=64",
    "data.vocab_size=512",
    "data.max_docs=200",
]
MODEL = ["model.n_layer=2", "model.n_head=4", "model.n_kv_head=2", "model.d_model=64", "model.max_seq_len=64"]
TRAIN = [
    f"train.max_steps={MAX_STEPS}",
    "train.micro_batch_size=8",
    "train.log_every=4",
    f"train.val_every={VAL_EVERY}",
    "train.val_batches=2",
    "optim.warmup_steps=4",
    "optim.lr=3e-3",
    "train.dtype=fp32",
    "train.device=cpu",
]
RECIPE = [
    "optim.name=adamw",
    "optim.schedule=cosine",
    "train.compile=false",
    "train.time_budget_min=null",
    "train.grad_accum_steps=1",
]
RUN = [
    "name=chaos",
    f"checkpoint.every={EVERY}",
    "checkpoint.keep_last=2",
    "resources.nproc_per_node=2",
    "resources.max_retries=2",
    "resources.max_requeues=4",
    "resources.time_min=15",
    "parallel.collective_timeout_s=30",
]

# Keys that never change what a run computes: left out of a reference run's key.
POLICY_PREFIXES = (
    "checkpoint.every=",
    "checkpoint.keep_last=",
    "checkpoint.keep_every=",
    "checkpoint.async_save=",
    "resources.",
    "executor=",
    "runs_dir=",
    "name=",
    "parallel.collective_timeout_s=",
    "train.log_every=",
)


def overrides(data_dir: str | Path, *extra: str) -> list[str]:
    """The chaos job's overrides on jobs/pretrain.yaml; later entries win (OmegaConf applies them in order)."""
    return [*DATA, f"data.dir={data_dir}", *MODEL, *TRAIN, *RECIPE, *RUN, *extra]


def math_key(resolved: dict) -> list[str]:
    """The keys of a resolved config that decide the numbers, as sorted `key=value` lines."""

    def leaves(node, prefix=""):
        for k, v in node.items():
            if isinstance(v, dict):
                yield from leaves(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}={json.dumps(v, sort_keys=True)}"

    return sorted(item for item in leaves(resolved) if not item.startswith(POLICY_PREFIXES))


def committed_before(step: int) -> int:
    """The newest checkpoint committed before training step `step` runs (sync saves): 0 = none."""
    return ((step - 1) // EVERY) * EVERY
