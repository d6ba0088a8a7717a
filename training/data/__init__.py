"""The data pipeline: raw text -> BPE tokenizer -> packed MDS shards -> resumable batches.

    corpus.py     where documents come from (the demo corpus, .txt / .jsonl / .parquet files)
    tokenizer.py  train / load a byte-level BPE tokenizer; bytes per token for bits-per-byte
    prepare.py    tokenize, pack into seq_len+1 windows, write train/ and val/ shards + meta.json
    loader.py     (inputs, targets) batches over the shards, resumable mid-epoch

This module stays import-light (no torch, no streaming) so a config error is reported fast.
"""

from jobspec.contract import UserError


class DataError(UserError, ValueError):
    """Data that can't be used. The message is meant for the user, as is."""
