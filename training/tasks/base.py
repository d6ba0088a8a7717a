"""What the trainer asks of a task: one job kind's batches, loss, evaluation and resumable data position.

Every kind in training/main.py's TASKS implements this Protocol; the trainer calls nothing else, so a new
kind is one file that fills these in. Pretraining (tasks/pretrain.py) is the smallest example.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Protocol

import torch

from model.config import GPTConfig


class Task(Protocol):
    """Built as Task(cfg, dist_info, run_dir): the job's config, the process group, and the run folder, where a
    task may write files of its own (classify: its label set and evaluation report)."""

    # The model's shape when the task starts from an existing model (post-training takes its source's),
    # else None: the trainer builds the job's `model:` section with `vocab_size` rows.
    model_cfg: Optional[GPTConfig]
    vocab_size: int
    # The nn.Module class the trainer builds: GPT, or a subclass with another head (model/reward.py).
    model_class: type
    # The tokenizer.json the run trains with: the trainer copies it into the run folder.
    tokenizer_file: Path
    # Optional (False if absent): loss() can take a tensor-parallel model's logits sharded over the vocabulary
    # (model/parallelize.py token_cross_entropy); the trainer then runs loss() and its backward inside
    # vocab_parallel_loss(), and no rank holds logits over the whole vocabulary.
    vocab_parallel_loss: bool

    def next_batch(self) -> Any:
        """The next micro-batch of this rank, already on the rank's device."""

    def loss(self, model: torch.nn.Module, batch: Any) -> tuple[torch.Tensor, int | torch.Tensor]:
        """(the micro-batch's loss summed over its items, the number of items): tokens for pretraining,
        completion tokens for SFT, pairs for DPO and reward models, completions for GRPO. The trainer divides
        the step's sum by the step's count over every micro-batch and rank, so that each item weighs the same
        however the step is split (a mean of micro-batch means would weigh sparse micro-batches more)."""

    def tokens_per_batch(self, batch: Any) -> int:
        """Tokens this micro-batch processed on this rank (for tokens/s and MFU)."""

    def train_metrics(self) -> dict:
        """The task's own numbers since the last log (DPO's rewards/*, GRPO's reward and KL); {} for none."""

    def evaluate(self, model: torch.nn.Module) -> dict:
        """Validation metrics, identical on every rank (a collective: every rank calls it)."""

    def state_dict(self) -> dict:
        """The data position (JSON-able), saved in each checkpoint so a resume draws the same batches."""

    def load_state_dict(self, state: dict) -> None:
        """Restore the data position of `state_dict()`."""
