"""Supervised fine-tuning: next-token loss on the assistant's part of chat examples only.

The model starts from checkpoint.init_from and keeps its shape and tokenizer. Examples (JSON lines
of {"prompt", "completion"} or {"messages"}) are encoded once in the chat format
(training/posttrain/chat.py), then drawn in a seeded permutation per epoch and packed into rows
of data.seq_len tokens, each document attending only to itself with positions from 0.

Batch order: all ranks walk the same permutation and pack the same global batch of
dp_size x micro_batch_size rows; data-parallel rank r takes its slice (tensor-parallel peers share
a dp rank, so they see the same rows). The position is (epoch, cursor): two integers saved in each
checkpoint, so a resumed run draws exactly the batches the uninterrupted one would have.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from model.document_attention import document_attention_mask
from model.gpt import GPT
from model.parallelize import token_cross_entropy
from training.data.tokenizer import load_tokenizer
from training.data import DataError
from training.metrics import say
from training.posttrain.chat import IGNORE, check_example, collate, encode_examples, pack, padding_id
from training.posttrain.examples import data_files
from training.posttrain.jsonl import read_jsonl
from training.run_folder import starting_point


class SFTTask:
    model_class = GPT
    vocab_parallel_loss = True  # loss() takes logits sharded over the vocabulary under tensor parallelism

    def __init__(self, cfg, dist_info, run_dir: Path):
        self.cfg, self.dist = cfg, dist_info
        # The model's shape and tokenizer are the source's (checkpoint.init_from), not the job's model: section.
        self.model_cfg, tokenizer_path = starting_point(cfg.checkpoint.init_from, cfg.data.tokenizer)
        self.vocab_size = self.model_cfg.vocab_size
        self.tokenizer_file = tokenizer_path
        self.tokenizer = load_tokenizer(tokenizer_path)
        self.seq_len = cfg.data.seq_len
        if self.seq_len > self.model_cfg.max_seq_len:
            raise DataError(
                f"key 'data.seq_len' has the value {self.seq_len}, but the model of checkpoint.init_from="
                f"{cfg.checkpoint.init_from!r} was built for at most {self.model_cfg.max_seq_len} tokens"
            )
        self.packing = cfg.sft.packing
        self.batch_size = cfg.train.micro_batch_size
        train_path, val_path = data_files(cfg.sft, "sft", "sft", tokenizer_path, self.seq_len, dist_info)
        self.train = self._encode(train_path, "sft.train_file")
        self.val = self._encode(val_path, "sft.val_file")[: cfg.sft.val_max or None]
        self.epoch, self.cursor = 0, 0
        self._order = None

    def _encode(self, path, key: str) -> list[tuple[list[int], list[int]]]:
        """The file's examples as (input_ids, labels); those longer than seq_len are left out, not cut
        (a cut completion would lose its end-of-turn token, and the model wouldn't learn to stop)."""
        records = read_jsonl(path, what=key, check=lambda r: check_example(self.tokenizer, r))
        encoded = encode_examples(self.tokenizer, records, None)
        fitting = [e for e in encoded if len(e[0]) <= self.seq_len]
        if not fitting:
            raise DataError(
                f"key '{key}' = {str(path)!r}: none of its {len(encoded)} examples fits in "
                f"data.seq_len={self.seq_len} tokens"
            )
        if len(fitting) < len(encoded):
            say(
                f"sft: {len(encoded) - len(fitting)} of the {len(encoded)} examples of {path} are longer than "
                f"data.seq_len={self.seq_len} tokens: left out",
                self.dist.is_main,
            )
        return fitting

    # ------------------------------------------------------------ training batches

    def _permutation(self) -> list[int]:
        if self._order is None:
            gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + self.epoch)
            self._order = torch.randperm(len(self.train), generator=gen).tolist()
        return self._order

    def _next_example(self) -> tuple[list[int], list[int]]:
        """The example at the cursor (not consumed)."""
        if self.cursor == len(self.train):
            self.epoch, self.cursor, self._order = self.epoch + 1, 0, None
        return self.train[self._permutation()[self.cursor]]

    def _global_rows(self, n_rows: int) -> list[list]:
        """The next n_rows groups of examples, each group filling one row. A row closes when the next
        example doesn't fit; that example stays at the cursor and opens the next row (or batch)."""
        rows, current, used = [], [], 0
        while len(rows) < n_rows:
            ex = self._next_example()
            if current and (not self.packing or used + len(ex[0]) > self.seq_len):
                rows.append(current)
                current, used = [], 0
                continue
            current.append(ex)
            used += len(ex[0])
            self.cursor += 1
        return rows

    def next_batch(self) -> dict:
        groups = self._global_rows(self.batch_size * self.dist.dp_size)
        mine = groups[self.dist.dp_rank * self.batch_size : (self.dist.dp_rank + 1) * self.batch_size]
        rows = [pack(group, self.seq_len, pad_id=padding_id(self.tokenizer))[0] for group in mine]
        return {k: v.to(self.dist.device, non_blocking=True) for k, v in collate(rows).items()}

    def _logits(self, model, batch) -> torch.Tensor:
        if not self.packing:  # one example per row, padded on the right: plain causal attention is enough
            return model(batch["input_ids"])
        mask = document_attention_mask(batch["doc_ids"], self.model_cfg.head_dim)
        return model(batch["input_ids"], batch["position_ids"], mask)

    def loss(self, model, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-entropy summed over this micro-batch's completion tokens (labels != -100), and their number."""
        labels = batch["labels"]
        total = token_cross_entropy(self._logits(model, batch), labels, ignore_index=IGNORE, reduction="sum")
        return total, (labels != IGNORE).sum()

    def tokens_per_batch(self, batch) -> int:
        return batch["input_ids"].numel()

    def train_metrics(self) -> dict:
        return {}

    # ------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self, model) -> dict:
        """Held-out completion loss (mean nats per completion token, <|im_end|> included) and token accuracy."""
        rows = pack(self.val, self.seq_len, packing=self.packing, pad_id=padding_id(self.tokenizer))
        mine = rows[self.dist.dp_rank :: self.dist.dp_size]
        # Every rank runs the same number of forward passes (sharded models need all ranks in each):
        # short shares are filled with copies whose labels are all ignored.
        per_rank = -(-len(rows) // self.dist.dp_size)
        blank = dict(rows[0], labels=torch.full_like(rows[0]["labels"], IGNORE))
        mine += [blank] * (per_rank - len(mine))
        sums = torch.zeros(3, dtype=torch.float64)  # nats, tokens, correct
        for i in range(0, per_rank, self.batch_size):
            batch = {k: v.to(self.dist.device) for k, v in collate(mine[i : i + self.batch_size]).items()}
            logits = self._logits(model, batch).float()
            labels = batch["labels"]
            keep = labels != IGNORE
            nats = F.cross_entropy(
                logits.view(-1, logits.size(-1)), labels.view(-1), ignore_index=IGNORE, reduction="sum"
            )
            correct = ((logits.argmax(-1) == labels) & keep).sum()
            sums += torch.stack([nats.double(), keep.sum().double(), correct.double()]).cpu()
        if self.dist.world_size > 1:
            sums = sums.to(self.dist.device)
            dist.all_reduce(sums)  # TP peers counted the same rows: the ratios below are unaffected
            sums = sums.cpu()
        nats, tokens, correct = sums.tolist()
        return {"val_loss": nats / tokens, "val_token_acc": correct / tokens, "val_examples": len(self.val)}

    # ------------------------------------------------------------ resumable state

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor, self._order = state["epoch"], state["cursor"], None
