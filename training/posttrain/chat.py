"""Conversations rendered by the model folder's own chat template, and turned into token ids, loss labels and
packed rows.

The template is the tokenizer folder's (training/data/special_tokens.py reads it: chat_template.jinja or
tokenizer_config.json's chat_template), rendered in jinja's sandbox (chat_template.py); orch's own models ship
ChatML:

    <|im_start|>user
    Write the Python function `def f(x):` ...<|im_end|>
    <|im_start|>assistant
    def f(x):
        ...<|im_end|>

The rendered text is encoded as transformers' apply_chat_template encodes it: special tokens spelled by the
template become their ids (as in transformers, so does a message's text that spells one), and no BOS is added
beyond the template's. Loss is on what the assistant says,
its end-of-turn token included (the model must learn to stop): exactly the template's {% generation %} blocks,
or else the assistant turns found by rendering prefixes; never the prompt, the role headers or padding.
Labels are already shifted: labels[t] is the token that the logits at position t predict, -100 where nothing
is learned.

An example is {"messages": [...]} or {"prompt", "completion"}, each a string or a list of messages (TRL's
conversational form); only the completion's assistant turns are learned.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import torch

from training.data import DataError
from training.data.special_tokens import CHATML, FolderTokenizer, special_tokens
from training.posttrain.chat_template import ChatTemplate, assistant_token_mask, template_of

IGNORE = -100
CHAT_TEMPLATE = CHATML  # what orch writes for its own models (exported with them)


def _folder_tokenizer(tokenizer):
    """A loaded tokenizer as it is; a bare one of ours read as its folder would describe it."""
    return tokenizer if isinstance(tokenizer, FolderTokenizer) else FolderTokenizer(tokenizer, os.devnull)


def chat_template(tokenizer) -> ChatTemplate:
    """The tokenizer folder's chat template; a DataError where the folder ships none."""
    tokenizer = _folder_tokenizer(tokenizer)
    template = template_of(tokenizer)
    if template is None:
        raise DataError(
            f"the tokenizer folder {tokenizer.folder} has no chat template (no chat_template.jinja, no "
            "'chat_template' in tokenizer_config.json): chat data and chat prompts need the model's own template"
        )
    return template


def render_chat(messages: Sequence[dict], add_generation_prompt: bool = False, tokenizer=None) -> str:
    """The text of a conversation in the tokenizer's template (ChatML without one), exactly as transformers
    renders it."""
    if tokenizer is None:
        return ChatTemplate(CHATML, {}).render(messages, add_generation_prompt)
    return chat_template(tokenizer).render(messages, add_generation_prompt)


def end_of_turn_id(tokenizer) -> int:
    """The token that ends an assistant reply as the template renders one: a stop token for chat generation."""
    tokenizer = _folder_tokenizer(tokenizer)
    cached = tokenizer.__dict__.get("_end_of_turn")
    if cached is None:
        messages = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
        ids, learn = encode_conversation(tokenizer, messages)
        cached = tokenizer.__dict__["_end_of_turn"] = [t for t, keep in zip(ids, learn) if keep][-1]
    return cached


def stop_ids(tokenizer, chat: bool = False) -> list[int]:
    """The tokens generation stops at: the folder's end-of-sequence ids, and for a chat the end of a turn."""
    stops = list(special_tokens(_folder_tokenizer(tokenizer)).stops)
    if chat and end_of_turn_id(tokenizer) not in stops:
        stops.append(end_of_turn_id(tokenizer))
    return stops


def _messages(value, key: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "assistant" if key in ("completion", "chosen", "rejected") else "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise DataError(
            f"key {key!r} must be a string or a non-empty list of {{'role', 'content'}} objects, "
            f"got {str(value)[:80]!r}"
        )
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{key}[{i}] must be {{'role': a string, 'content': a string}}, got {str(m)[:80]!r}")
    return value


def to_conversation(example: dict) -> tuple[list[dict], int]:
    """(messages, index of the first message whose assistant turns are learned) of an example:
    {"messages": [...]}, or {"prompt", "completion"} each a string or a list of messages."""
    if "messages" in example:
        return _messages(example["messages"], "messages"), 0
    for key in ("prompt", "completion"):
        if key not in example:
            raise DataError(
                f"an example needs the keys 'prompt' and 'completion' (or 'messages'); key {key!r} is missing"
            )
    prompt, completion = _messages(example["prompt"], "prompt"), _messages(example["completion"], "completion")
    return prompt + completion, len(prompt)


def check_example(tokenizer, example: dict) -> None:
    """Refuse an example the template can't render, or one with no assistant turn to learn (DataError)."""
    messages, learn_from = to_conversation(example)
    if not any(m["role"] == "assistant" for m in messages[learn_from:]):
        raise DataError("the conversation has no assistant turn after its prompt: there is nothing to learn")
    chat_template(tokenizer).assistant_spans(messages, learn_from)


def check_prompt(tokenizer, record: dict) -> None:
    """Refuse a record whose 'prompt' (a string or a list of messages) is missing or that the template refuses."""
    if "prompt" not in record:
        raise DataError(f"the record has no key 'prompt' (it has {sorted(record)})")
    chat_template(tokenizer).render(_messages(record["prompt"], "prompt"), add_generation_prompt=True)


def _encode_rendered(tokenizer, texts: list[str]):
    """Encodings of rendered conversations: special tokens that the template spells become their ids."""
    inner = tokenizer.tokenizer
    before = inner.encode_special_tokens
    inner.encode_special_tokens = False
    try:
        return inner.encode_batch(texts, add_special_tokens=False)
    finally:
        inner.encode_special_tokens = before


def encode_conversation(tokenizer, messages: Sequence[dict], learn_from: int = 0) -> tuple[list[int], list[bool]]:
    """(token ids of the rendered conversation, whether each is a learned assistant token)."""
    tokenizer = _folder_tokenizer(tokenizer)
    text, spans = chat_template(tokenizer).assistant_spans(messages, learn_from)
    [encoding] = _encode_rendered(tokenizer, [text])
    return list(encoding.ids), assistant_token_mask(encoding, spans)


def encode_examples(tokenizer, examples: Sequence[dict], seq_len: Optional[int]) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) of each example, at most seq_len long (None = no cut); the ids are the template's
    rendering encoded, the labels the learned assistant turns' tokens."""
    tokenizer = _folder_tokenizer(tokenizer)
    template = chat_template(tokenizer)
    rendered = [template.assistant_spans(*to_conversation(e)) for e in examples]
    out = []
    for (_, spans), encoding in zip(rendered, _encode_rendered(tokenizer, [text for text, _ in rendered])):
        ids, learn = list(encoding.ids), assistant_token_mask(encoding, spans)
        input_ids = ids[:-1]
        labels = [t if keep else IGNORE for t, keep in zip(ids[1:], learn[1:])]
        if seq_len is not None:
            input_ids, labels = input_ids[:seq_len], labels[:seq_len]
        out.append((input_ids, labels))
    return out


def encode_example(tokenizer, example: dict, seq_len: Optional[int]) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one example; see encode_examples."""
    return encode_examples(tokenizer, [example], seq_len)[0]


def encode_prompt(tokenizer, prompt) -> list[int]:
    """Ids of a prompt (a user message string, or a list of messages) followed by the opening of the
    assistant's turn: the template's rendering with add_generation_prompt=True, for generation."""
    tokenizer = _folder_tokenizer(tokenizer)
    messages = _messages(prompt, "prompt")
    [encoding] = _encode_rendered(tokenizer, [chat_template(tokenizer).render(messages, add_generation_prompt=True)])
    return list(encoding.ids)


def padding_id(tokenizer) -> int:
    """The id rows are padded with (always masked by position, so any id would do)."""
    return special_tokens(_folder_tokenizer(tokenizer)).pad


# ---------------------------------------------------------------- packing


def pack(
    examples: Sequence[tuple[list[int], list[int]]], seq_len: int, *, packing: bool = True, pad_id: int = 0
) -> list[dict[str, torch.Tensor]]:
    """Rows of seq_len tokens: input_ids, labels, position_ids (0 at each document's start) and
    doc_ids (0, 1, ... per document in the row; the padding tail is one more document of its own,
    so its queries attend to something and never to a real document). Examples go into rows in
    order, a new row starting when the next one doesn't fit; packing=False: one example per row. pad_id: the
    tokenizer's (padding_id); any id is safe, since padding is masked by position."""
    rows, current = [], []
    for ex in examples:
        if len(ex[0]) > seq_len:
            raise ValueError(f"an example of {len(ex[0])} tokens is longer than seq_len={seq_len}")
        if current and (not packing or sum(len(e[0]) for e in current) + len(ex[0]) > seq_len):
            rows.append(_row(current, seq_len, pad_id))
            current = []
        current.append(ex)
    if current:
        rows.append(_row(current, seq_len, pad_id))
    return rows


def _row(examples, seq_len: int, pad_id: int) -> dict[str, torch.Tensor]:
    input_ids, labels, positions, doc_ids = [], [], [], []
    for doc, (ids, labs) in enumerate(examples):
        input_ids += ids
        labels += labs
        positions += range(len(ids))
        doc_ids += [doc] * len(ids)
    pad = seq_len - len(input_ids)
    input_ids += [pad_id] * pad
    labels += [IGNORE] * pad  # masked by position: pad_id may well be a real token's id
    positions += range(pad)
    doc_ids += [len(examples)] * pad
    return {
        "input_ids": torch.tensor(input_ids),
        "labels": torch.tensor(labels),
        "position_ids": torch.tensor(positions),
        "doc_ids": torch.tensor(doc_ids),
    }


def collate(rows: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack rows into a batch of [batch, seq_len] tensors."""
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
