"""The chat format (ChatML), and turning chat examples into token ids, loss labels and packed rows.

    <|im_start|>user
    Write the Python function `def f(x):` ...<|im_end|>
    <|im_start|>assistant
    def f(x):
        ...<|im_end|>

The special tokens are the tokenizer's reserved ids 2 and 3 (training/data/tokenizer.py), always
inserted by id: text that spells "<|im_end|>" stays ordinary characters. Loss is on what the
assistant says, its closing <|im_end|> included (the model must learn to stop); never on the
prompt, the role headers or padding. Labels are already shifted: labels[t] is the token that
the logits at position t predict, -100 where nothing is learned.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from training.data import DataError
from training.data.tokenizer import IM_END, IM_START, PAD_ID

IGNORE = -100
ROLES = ("system", "user", "assistant")

# The same format as a Jinja template, for transformers' apply_chat_template on exported models.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def render_chat(messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
    """The text of a conversation, rendered by CHAT_TEMPLATE exactly as transformers would."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(CHAT_TEMPLATE).render(messages=list(messages), add_generation_prompt=add_generation_prompt)


def special_ids(tokenizer) -> tuple[int, int]:
    """(<|im_start|> id, <|im_end|> id); a DataError if the tokenizer lacks them."""
    ids = tokenizer.token_to_id(IM_START), tokenizer.token_to_id(IM_END)
    if None in ids:
        raise DataError(
            f"the tokenizer has no {IM_START} / {IM_END} tokens, which the chat format needs "
            f"(tokenizers trained by `orch data prepare` reserve them as ids 2 and 3)"
        )
    return ids


def end_of_turn_id(tokenizer) -> int:
    """The token that ends an assistant reply: the stop token for generation."""
    return special_ids(tokenizer)[1]


def to_messages(example: dict) -> list[dict]:
    """The messages of an example: {"prompt", "completion"} or {"messages": [{"role", "content"}, ...]}."""
    if "messages" in example:
        messages = example["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(
                f"key 'messages' must be a non-empty list of {{'role', 'content'}} objects, got {str(messages)[:80]!r}"
            )
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise DataError(
                    f"messages[{i}] must be {{'role': one of {list(ROLES)}, 'content': a string}}, got {str(m)[:80]!r}"
                )
        return messages
    for key in ("prompt", "completion"):
        if not isinstance(example.get(key), str):
            raise DataError(
                f"an example needs string keys 'prompt' and 'completion' (or 'messages'); "
                f"key {key!r} is {'missing' if key not in example else type(example[key]).__name__}"
            )
    return [{"role": "user", "content": example["prompt"]}, {"role": "assistant", "content": example["completion"]}]


def encode_examples(tokenizer, examples: Sequence[dict], seq_len: Optional[int]) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) of each example, at most seq_len long (None = no cut). Contents are
    encoded in one parallel batch; the ids decode to exactly render_chat(messages)."""
    conversations = [to_messages(e) for e in examples]
    encode_batch = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    contents = iter(encode_batch([m["content"] for c in conversations for m in c], add_special_tokens=False))
    out = []
    for conversation in conversations:
        ids, learn = _conversation(tokenizer, conversation, contents)
        input_ids = ids[:-1]
        labels = [t if keep else IGNORE for t, keep in zip(ids[1:], learn[1:])]
        if seq_len is not None:
            input_ids, labels = input_ids[:seq_len], labels[:seq_len]
        out.append((input_ids, labels))
    return out


def _conversation(tokenizer, messages, contents) -> tuple[list[int], list[bool]]:
    """Token ids of the messages as CHAT_TEMPLATE renders them, and whether each carries loss:
    the assistant's content and its closing <|im_end|> do."""
    start, end = special_ids(tokenizer)
    newline = _encode(tokenizer, "\n")
    ids, learn = [], []
    for m in messages:
        header = _encode(tokenizer, m["role"] + "\n")
        body = next(contents).ids
        said = m["role"] == "assistant"
        ids += [start, *header, *body, end, *newline]
        learn += [False] * (1 + len(header)) + [said] * (len(body) + 1) + [False] * len(newline)
    return ids, learn


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False).ids


def encode_example(tokenizer, example: dict, seq_len: Optional[int]) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one example; see encode_examples."""
    return encode_examples(tokenizer, [example], seq_len)[0]


def encode_prompt(tokenizer, prompt) -> list[int]:
    """Ids of a prompt (a user message string, or a list of messages) followed by the opening of
    the assistant's turn: render_chat(messages, add_generation_prompt=True), for generation."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else to_messages({"messages": prompt})
    contents = iter(tokenizer.encode_batch([m["content"] for m in messages], add_special_tokens=False))
    ids, _ = _conversation(tokenizer, messages, contents)
    return ids + [special_ids(tokenizer)[0], *_encode(tokenizer, "assistant\n")]


# ---------------------------------------------------------------- packing


def pack(
    examples: Sequence[tuple[list[int], list[int]]], seq_len: int, *, packing: bool = True, pad_id: int = PAD_ID
) -> list[dict[str, torch.Tensor]]:
    """Rows of seq_len tokens: input_ids, labels, position_ids (0 at each document's start) and
    doc_ids (0, 1, ... per document in the row; the padding tail is one more document of its own,
    so its queries attend to something and never to a real document). Examples go into rows in
    order, a new row starting when the next one doesn't fit; packing=False: one example per row."""
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
