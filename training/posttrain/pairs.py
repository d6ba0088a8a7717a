"""Preference pairs for the `rm` and `dpo` tasks: the files, a resumable stream, and batches.

A record is {"prompt", "chosen", "rejected"}, each a string or, as TRL takes them, a list of messages (the
prompt's conversation, and each answer's assistant turns). A pair whose answers are the same, or that the
model's chat template refuses, is refused at loading with its file and line.

A batch holds the chosen answers in its first half of rows and the rejected ones in the second,
each row the chat-formatted prompt and answer (training/posttrain/chat.py), right-padded.
"""

from __future__ import annotations

import torch

from training.data import DataError
from training.data.tokenizer import load_tokenizer
from training.posttrain.chat import check_example, encode_examples, padding_id
from training.posttrain.examples import ExampleStream, data_files, eval_batches, pad_right
from training.posttrain.jsonl import read_jsonl
from training.run_folder import starting_point

KEYS = ("prompt", "chosen", "rejected")


class PreferenceData:
    def __init__(self, cfg, dist_info, section_name: str):
        section = cfg[section_name]
        self.dist = dist_info
        # The model's shape and tokenizer are the source's (checkpoint.init_from), not the job's model: section.
        self.model_cfg, tokenizer_path = starting_point(cfg.checkpoint.init_from, cfg.data.tokenizer)
        self.tokenizer_file = tokenizer_path
        self.tokenizer = load_tokenizer(tokenizer_path)
        self.max_len = min(cfg.data.seq_len, self.model_cfg.max_seq_len)
        train, val = data_files(
            section, section_name, "pref", tokenizer_path, self.max_len, dist_info, max_docs=cfg.data.max_docs
        )
        self.train = read_jsonl(train, what=f"{section_name}.train_file", check=self.check)
        self.val = read_jsonl(val, what=f"{section_name}.val_file", check=self.check)[: section.val_max or None]
        self.batch_size = cfg.train.micro_batch_size
        self.stream = ExampleStream(
            self.train, self.batch_size, dist_info.dp_rank, dist_info.dp_size, cfg.seed, f"{section_name}.train_file"
        )

    def check(self, record: dict) -> None:
        for key in KEYS:
            if key not in record:
                raise DataError(
                    f"the record has no key {key!r} (it has {sorted(record)}); every line needs {list(KEYS)}"
                )
        if record["chosen"] == record["rejected"]:
            raise DataError("'chosen' and 'rejected' are the same: a pair must prefer one answer to another")
        for side in ("chosen", "rejected"):
            check_example(self.tokenizer, {"prompt": record["prompt"], "completion": record[side]})

    def encode(self, records: list[dict]) -> dict:
        """tokens [2B, T] (chosen rows, then rejected), shifted labels [2B, T] (-100 off the answer),
        last [2B] (each row's last real token: the answer's end-of-turn token unless it was cut)."""
        examples = [{"prompt": r["prompt"], "completion": r[side]} for side in ("chosen", "rejected") for r in records]
        encoded = encode_examples(self.tokenizer, examples, self.max_len)
        tokens, labels = pad_right(
            [ids for ids, _ in encoded], padding_id(self.tokenizer), [labs for _, labs in encoded]
        )
        last = torch.tensor([len(ids) - 1 for ids, _ in encoded])
        device = self.dist.device
        return {"tokens": tokens.to(device), "labels": labels.to(device), "last": last.to(device)}

    def next_batch(self) -> dict:
        return self.encode(self.stream.next())

    def val_batches(self):
        """(batch, weights [B]) pairs: this rank's share of the held-out pairs, equal in number on every rank."""
        for records, weights in eval_batches(self.val, self.batch_size, self.dist.dp_rank, self.dist.dp_size):
            yield self.encode(records), torch.tensor(weights, dtype=torch.float64)
