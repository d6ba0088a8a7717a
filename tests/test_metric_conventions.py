"""Bits per byte and acc_norm follow the conventions of what they are compared with, on non-ASCII text:
xz compresses the documents' raw text (no separators), lm-evaluation-harness divides by characters."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from model.config import GPTConfig
from model.gpt import GPT
from training.data.tokenizer import EOS_ID, text_nats_and_bytes, token_byte_lengths, train_tokenizer
from training.evaluate.scoring import multiple_choice
from training.evaluate.tasks import Task

DOCS = [
    "Καλημέρα κόσμε, τι κάνεις σήμερα;",
    "日本語のテキストも数えます。",
    "naïve café, crème brûlée — déjà vu 🙂",
    "plain ASCII text between the others",
    "Ελληνικά και 中文 mixed",
]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(DOCS * 20, vocab_size=300)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=320, n_layer=2, n_head=4, d_model=32, max_seq_len=256, tie_embeddings=False))
    m.init_weights(seed=0)
    return m.eval()


def test_bits_per_byte_counts_the_texts_bytes_and_leaves_end_of_text_targets_out(tokenizer, model):
    """A packed sequence of non-ASCII documents, each after an <|endoftext|>: the targets spell exactly the
    documents' text, whose UTF-8 bytes are counted here from the strings themselves."""
    ids = [i for doc in DOCS for i in [EOS_ID, *tokenizer.encode(doc).ids]]
    x, y = torch.tensor(ids[:-1]), torch.tensor(ids[1:])
    with torch.no_grad():
        nats = F.cross_entropy(model(x[None])[0], y, reduction="none").double()
    byte_lengths = torch.tensor(token_byte_lengths(tokenizer), dtype=torch.float64)
    text_nats, nbytes = text_nats_and_bytes(nats, y, byte_lengths)

    assert nbytes.item() == sum(len(doc.encode("utf-8")) for doc in DOCS)  # 1-4 bytes a character
    assert sum(len(doc) for doc in DOCS) < nbytes.item()  # non-ASCII: fewer characters than bytes
    separators = y == EOS_ID
    assert separators.sum() == len(DOCS) - 1 and nats[separators].min() > 0  # the model pays for them ...
    assert text_nats.item() == pytest.approx(nats[~separators].sum().item(), rel=1e-12)  # ... bpb does not
    bpb = text_nats.item() / math.log(2) / nbytes.item()
    assert bpb < nats.sum().item() / math.log(2) / nbytes.item()


def choice_task(tmp_path: Path, docs: list[dict]) -> Task:
    return Task(
        name="non_ascii",
        path=tmp_path / "non_ascii.yaml",
        output_type="multiple_choice",
        docs=docs,
        doc_to_text="{{context}}",
        doc_to_choice="{{choices}}",
        doc_to_target="{{label}}",
    )


def test_acc_norm_divides_the_log_likelihood_by_characters_as_lm_eval_does(tokenizer, model, tmp_path):
    """Choices of about the same number of characters but 1 to 4 bytes each, so that dividing by bytes ranks
    them otherwise. Each record's label is the choice lm-evaluation-harness's acc_norm picks (the highest
    log-likelihood per character, len(choice)): ours must pick it every time."""
    choices = [
        ["café", "cafe", "日本語", "κόσμε"],
        ["déjà vu", "deja vu", "中文字", "🙂🙂"],
        ["naïve", "naive", "Ελλην", "テキスト"],
        ["brûlée", "brulee", "σήμερα", "のテキ"],
    ]
    docs = [
        {"context": context, "choices": c, "label": 0}
        for context in ("Καλημέρα", "plain ASCII", "日本語の", "mixed 中文", "crème")
        for c in choices
    ]
    lls = multiple_choice(model, tokenizer, choice_task(tmp_path, docs), batch_size=8)["loglikelihoods"]

    def picks(length) -> list[int]:
        return [max(range(len(ll)), key=lambda k: ll[k] / length(doc["choices"][k])) for doc, ll in zip(docs, lls)]

    by_characters, by_bytes = picks(len), picks(lambda c: len(c.encode("utf-8")))
    assert by_characters != by_bytes  # the two conventions disagree on these records
    labelled = [dict(doc, label=pick) for doc, pick in zip(docs, by_characters)]
    result = multiple_choice(model, tokenizer, choice_task(tmp_path, labelled), batch_size=8)
    assert result["acc_norm"] == 1.0
    assert result["acc"] == sum(max(range(4), key=ll.__getitem__) == d["label"] for d, ll in zip(labelled, lls)) / 20
