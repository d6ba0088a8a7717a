"""Byte-level BPE (GPT-2 style) with Hugging Face `tokenizers`.

Byte-level means the base vocabulary is the 256 bytes, so any string encodes, nothing is ever
<unk>, and decode(encode(s)) == s exactly. Special tokens are only ever inserted by id: text that
happens to contain "<|endoftext|>" is encoded as ordinary characters (encode_special_tokens).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from training.data import DataError
from training.data.special_tokens import EOS, IM_END, IM_START, PAD, FolderTokenizer

# Reserved first, so their ids are 0..3 in every tokenizer we train; consumers read them from the tokenizer's
# folder (special_tokens.py), never as fixed ids.
SPECIAL_TOKENS = [EOS, PAD, IM_START, IM_END]
EOS_ID, PAD_ID, IM_START_ID, IM_END_ID = range(len(SPECIAL_TOKENS))


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE of `vocab_size` tokens (special tokens and the 256 bytes included)."""
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise DataError(
            f"key 'data.vocab_size' has the value {vocab_size}, but a byte-level BPE needs "
            f"at least {256 + len(SPECIAL_TOKENS)} (256 bytes + {len(SPECIAL_TOKENS)} special tokens)"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # no " " added: exact round trip
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, even unseen ones
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tok.encode_special_tokens = True
    return tok


def load_tokenizer(path):
    """A tokenizer.json written by train_tokenizer (or any Hugging Face one), with the special tokens and chat
    template of its folder (training/data/special_tokens.py `FolderTokenizer`)."""
    return FolderTokenizer(_read_tokenizer(path), Path(path).parent)


def _read_tokenizer(path) -> Tokenizer:
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"no tokenizer file at {str(path)!r}: expected a Hugging Face tokenizer.json "
            f"(prepare the data first, or fix data.tokenizer)"
        )
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on bad JSON
        raise DataError(f"{str(path)!r} is not a Hugging Face tokenizer.json file ({e})") from None
    # Not saved in tokenizer.json: a runtime switch, set on every load.
    tok.encode_special_tokens = True
    return tok


def eos_id(tok) -> int:
    """The end-of-sequence id that separates packed documents: the tokenizer folder's own (special_tokens.py),
    else <|endoftext|>, which every tokenizer we train has."""
    if getattr(tok, "special", None) is not None:
        return tok.special.eos
    i = tok.token_to_id(EOS)
    if i is None:
        raise DataError(f"the tokenizer has no {EOS} token, which separates documents (data.tokenizer)")
    return i


def token_byte_lengths(tok: Tokenizer) -> np.ndarray:
    """How many UTF-8 bytes each token id decodes to (0 for special tokens).

    Bits per byte = sum(nats over target tokens that spell text) / ln(2) / sum(byte lengths of those
    tokens) (text_nats_and_bytes): unlike loss per token it doesn't depend on the tokenizer, so runs
    with different vocabularies (and xz) compare. A byte-level token string spells one byte per
    character, so its length is exact even for tokens that hold half of a multi-byte character.
    """
    byte_alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    lengths = np.zeros(tok.get_vocab_size(with_added_tokens=True), dtype=np.int64)
    for token, i in tok.get_vocab(with_added_tokens=False).items():
        if not byte_alphabet.issuperset(token):
            raise DataError(
                f"token {token!r} is not byte-level: bits per byte needs a byte-level BPE tokenizer (data.tokenizer)"
            )
        lengths[i] = len(token)
    for i, added in tok.get_added_tokens_decoder().items():
        lengths[i] = 0 if added.special else len(added.content.encode("utf-8"))
    return lengths


def text_nats_and_bytes(nats, targets, byte_lengths):
    """(nats, UTF-8 bytes) summed over the targets that spell text, for bits per byte; torch tensors: nats and
    targets of the same shape, byte_lengths from token_byte_lengths. Targets of zero bytes (<|endoftext|>
    between documents, padding) are left out of both: their nats would be charged to no byte of text, while
    the baseline, xz, compresses the raw text of the documents alone."""
    nbytes = byte_lengths[targets]
    return nats[nbytes > 0].sum(), nbytes.sum()
