"""Batches of post-training records (read whole by training.posttrain.jsonl): a resumable shuffled
stream per rank, equal held-out shares per rank, right padding.

The stream's position is two integers (epoch, position) saved in each checkpoint: a resumed run
draws the same batches.
"""

from __future__ import annotations

from typing import Sequence

import torch

from training.data import DataError
from training.posttrain.losses import IGNORE


class ExampleStream:
    """Endless batches of records for one data-parallel rank: each epoch is a fresh permutation
    (seeded by seed and epoch), cut into global batches of dp_size * batch_size; rank r takes its
    slice. A remainder too small for a global batch is skipped, so every rank steps together."""

    def __init__(self, records: list, batch_size: int, dp_rank: int, dp_size: int, seed: int, where: str):
        if len(records) < batch_size * dp_size:
            raise DataError(
                f"{where}: {len(records)} records can't fill one global batch of {batch_size} per rank "
                f"x {dp_size} ranks (lower train.micro_batch_size)"
            )
        self.records, self.batch_size, self.seed = records, batch_size, seed
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.epoch, self.position = 0, 0
        self._order = None

    def _permutation(self) -> list[int]:
        if self._order is None:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            self._order = torch.randperm(len(self.records), generator=gen).tolist()
        return self._order

    def next(self) -> list:
        step = self.batch_size * self.dp_size
        if self.position + step > len(self.records):
            self.epoch, self.position, self._order = self.epoch + 1, 0, None
        start = self.position + self.dp_rank * self.batch_size
        batch = [self.records[i] for i in self._permutation()[start : start + self.batch_size]]
        self.position += step
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position, self._order = state["epoch"], state["position"], None


def eval_batches(records: list, batch_size: int, dp_rank: int, dp_size: int) -> list[tuple[list, list[float]]]:
    """This rank's share of held-out records as (batch, weights) pairs. Every rank gets the same number of
    batches (sharded models need every rank in every forward pass): short ones are filled with repeats of
    weight 0."""
    mine = records[dp_rank::dp_size]
    per_rank = -(-len(records) // dp_size)
    n_batches = -(-per_rank // batch_size)
    out = []
    for b in range(n_batches):
        chunk = mine[b * batch_size : (b + 1) * batch_size]
        weights = [1.0] * len(chunk)
        while len(chunk) < batch_size:
            chunk.append(records[0])
            weights.append(0.0)
        out.append((chunk, weights))
    return out


def pad_right(
    rows: Sequence[Sequence[int]], pad_id: int, label_rows: Sequence[Sequence[int]] | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[batch, longest] token tensor padded on the right (causal attention never looks right, so no mask
    is needed), and the labels padded with IGNORE."""
    width = max(len(r) for r in rows)
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long) if label_rows is not None else None
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = torch.tensor(list(r), dtype=torch.long)
        if labels is not None:
            labels[i, : len(label_rows[i])] = torch.tensor(list(label_rows[i]), dtype=torch.long)
    return tokens, labels


def data_files(section, section_name: str, prefix: str, tokenizer_path, max_tokens: int, dist_info, max_docs=None):
    """(train, val) .jsonl paths: the section's train_file/val_file, or else the demo files derived from
    the standard library into its demo_dir (by rank 0, once; later runs reuse them). Only functions whose
    chat example fits max_tokens are kept; max_docs (data.max_docs) caps the source files read."""
    from pathlib import Path

    from training.posttrain.demo_data import write_demo_data

    if section.train_file or section.val_file:
        if not (section.train_file and section.val_file):
            raise DataError(
                f"{section_name}.train_file and {section_name}.val_file go together: set both "
                f"(got {section.train_file!r} and {section.val_file!r}), or neither for the demo data"
            )
        return Path(section.train_file), Path(section.val_file)
    if dist_info.is_main:
        write_demo_data(section.demo_dir, tokenizer_path, max_docs=max_docs, max_tokens=max_tokens)
    dist_info.barrier()
    return Path(section.demo_dir) / f"{prefix}_train.jsonl", Path(section.demo_dir) / f"{prefix}_val.jsonl"
