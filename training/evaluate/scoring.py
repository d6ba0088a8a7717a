"""The measurements: held-out perplexity and bits per byte, multiple choice by log-likelihood,
generation with a checker. Each takes a GPT in eval mode and returns a flat dict of numbers.

Multiple choice follows lm-evaluation-harness so that the same task scores the same under both:
the context's trailing whitespace moves to the continuation, the continuation's tokens are those
of encode(context + continuation) after encode(context)'s, the sequence is cut on the left to the
model's length, `acc` takes the choice of highest log-likelihood and `acc_norm` the highest
log-likelihood per character of the choice (len(choice), not its UTF-8 bytes: they differ on non-ASCII text).
"""

from __future__ import annotations

import ast
import math
from contextlib import nullcontext
from typing import Optional

import torch
import torch.nn.functional as F

from training.evaluate.sandbox import passes
from training.evaluate.tasks import Task
from training.posttrain.collapse import collapse_stats, within_budget


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context tokens, continuation tokens) as lm-evaluation-harness splits them."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation).ids
    ctx = tokenizer.encode(context).ids
    return ctx, whole[len(ctx) :]


@torch.no_grad()
def loglikelihoods(
    model, requests: list[tuple[list[int], list[int]]], batch_size: int, autocast=nullcontext
) -> list[tuple[float, bool]]:
    """(sum of log p(continuation | context), whether greedy decoding gives the continuation) per request."""
    device = next(model.parameters()).device
    max_len = model.cfg.max_seq_len
    rows = []
    for ctx, cont in requests:
        if not cont:
            raise ValueError("a continuation encodes to no tokens")
        full = (ctx + cont)[-(max_len + 1) :]
        rows.append((full[:-1], full[1:], len(cont)))
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))  # similar lengths share a batch
    out: list[Optional[tuple[float, bool]]] = [None] * len(rows)
    for start in range(0, len(order), batch_size):
        batch = [rows[i] for i in order[start : start + batch_size]]
        width = max(len(x) for x, _, _ in batch)
        # Right padding: a causal model's earlier positions never see it.
        inputs = torch.zeros(len(batch), width, dtype=torch.long)
        for j, (x, _, _) in enumerate(batch):
            inputs[j, : len(x)] = torch.tensor(x)
        with autocast():
            logits = model(inputs.to(device))
        logprobs = F.log_softmax(logits.float(), dim=-1).cpu()
        for j, (x, y, n) in enumerate(batch):
            pos = torch.arange(len(x) - n, len(x))
            target = torch.tensor(y[-n:])
            lp = logprobs[j, pos]
            out[order[start + j]] = (float(lp.gather(1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all()))
    return out  # type: ignore[return-value]


def multiple_choice(model, tokenizer, task: Task, batch_size: int, autocast=nullcontext) -> dict:
    """acc and acc_norm (log-likelihood per character of the choice) over the task's records."""
    from training.data.special_tokens import special_tokens

    special = special_tokens(tokenizer)
    start = special.bos if special.bos is not None else special.eos
    requests, spans = [], []
    for doc in task.docs:
        context, choices = task.text(doc), task.choices(doc)
        spans.append((len(requests), choices, task.target(doc)))
        for choice in choices:
            ctx, cont = encode_pair(tokenizer, context, task.target_delimiter + choice)
            requests.append((ctx or [start], cont))  # an empty context starts from BOS (else EOS), as in the harness
    scores = loglikelihoods(model, requests, batch_size, autocast)
    acc = acc_norm = 0
    per_doc = []
    for first, choices, target in spans:
        lls = [scores[first + k][0] for k in range(len(choices))]
        per_char = [ll / max(1, len(c)) for ll, c in zip(lls, choices)]  # characters, as lm-eval divides
        acc += max(range(len(lls)), key=lls.__getitem__) == target
        acc_norm += max(range(len(lls)), key=per_char.__getitem__) == target
        per_doc.append(lls)
    n = len(spans)
    return {"acc": acc / n, "acc_norm": acc_norm / n, "n": n, "loglikelihoods": per_doc}


def cut_at_stop(text: str, stops: list[str]) -> str:
    ends = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return text[: min(ends)] if ends else text


def passes_test(program: str, timeout_s: float = 10.0) -> bool:
    """Run a program (the prompt, the completion and the record's test) confined (sandbox.py): True if it
    exits 0 within the time limit after its test ran to the end (sandbox.passes)."""
    return passes(program, timeout_s)


def parses(prompt: str, completion: str) -> bool:
    """prompt + completion is valid Python, and the completion continues the prompt's code rather
    than starting new top-level statements (a function prompt needs a body: its docstring alone
    parses, and so does junk at column 0 after it)."""
    if not completion.strip():
        return False
    try:
        tree = ast.parse(prompt + completion)
    except (SyntaxError, ValueError):
        return False
    try:
        before = ast.parse(prompt)
    except (SyntaxError, ValueError):
        return True  # e.g. "def f(x):" with no body yet: parsing at all is the test
    return len(tree.body) == len(before.body) and ast.dump(tree) != ast.dump(before)


def prompt_ids(tokenizer, task: Task, doc: dict, chat: bool) -> list[int]:
    """The ids a generation starts from: the task's text, or for a chat model with metadata.chat_prompt,
    the user's message in the chat format and the assistant's reply begun with that text."""
    from training.data.special_tokens import special_tokens

    text = task.text(doc)
    message = task.chat_message(doc) if chat else None
    if message is None:
        special = special_tokens(tokenizer)
        return tokenizer.encode(text).ids or [special.bos if special.bos is not None else special.eos]
    from training.posttrain.chat import encode_prompt

    return encode_prompt(tokenizer, message) + tokenizer.encode(text, add_special_tokens=False).ids


def generation(model, tokenizer, task: Task, batch_size: int, autocast=nullcontext, chat: bool = False) -> dict:
    """Greedy completions cut at the task's stop strings; `parses`: prompt + completion is valid Python that
    completes the prompt's code (see parses()); `passes`: and the record's `test` code then runs without
    error (records without one count as failed); distinct_frac and, when every record has a `reference`
    (the real body), len_ratio against the reference as long as a completion may be (within_budget, stop strings):
    training/posttrain/collapse.py's signs of a collapsed model. chat: ask in the chat format (see prompt_ids),
    stopping at the end of the assistant's turn too."""
    from model.generate import generate
    from training.posttrain.chat import stop_ids

    prompts = [task.text(doc) for doc in task.docs]
    stops = stop_ids(tokenizer, chat=chat)  # the folder's end-of-sequence ids, and in a chat the end of a turn
    # A long prompt keeps its end, leaving room for max_gen_toks (at least half the window), as in the harness.
    keep = max(model.cfg.max_seq_len - task.max_gen_toks, model.cfg.max_seq_len // 2)
    completions = []
    for start in range(0, len(prompts), batch_size):
        ids = [prompt_ids(tokenizer, task, doc, chat)[-keep:] for doc in task.docs[start : start + batch_size]]
        with autocast():
            new = generate(model, ids, task.max_gen_toks, temperature=0, stop_tokens=stops)
        completions += [cut_at_stop(tokenizer.decode([t for t in row if t not in stops]), task.until) for row in new]
    parsed = passed = 0
    for doc, prompt, completion in zip(task.docs, prompts, completions):
        program = prompt + completion
        ok = parses(prompt, completion)
        parsed += ok
        if "passes" in task.metrics and ok and doc.get("test"):
            passed += passes_test(program + "\n\n" + doc["test"] + "\n")
    n = len(prompts)
    out = {
        "parses": parsed / n,
        "n": n,
        "samples": [{"prompt": p, "completion": c} for p, c in zip(prompts[:3], completions[:3])],
    }
    # one answer for every prompt, or answers far shorter than the real ones: parses would be hollow
    references = [within_budget(doc.get("reference"), tokenizer, task.max_gen_toks) for doc in task.docs]
    references = [None if r is None else cut_at_stop(r, task.until) for r in references]  # as completions are
    out.update(collapse_stats(completions, n, references))
    if "passes" in task.metrics:
        out["passes"] = passed / n
    return out


@torch.no_grad()
def heldout(
    model, data_cfg, batch_size: int, max_batches: int, byte_lengths: torch.Tensor, autocast=nullcontext
) -> dict:
    """Loss (nats/token), perplexity and bits per byte over the val split of data_cfg.dir, computed as
    the pretraining validation computes val_loss and val_bpb (so the numbers compare)."""
    from training.data.loader import iter_val_batches

    from training.data.tokenizer import text_nats_and_bytes

    device = next(model.parameters()).device
    nats = tokens = text_nats = nbytes = 0.0
    for i, (x, y) in enumerate(iter_val_batches(data_cfg, batch_size)):
        if max_batches and i >= max_batches:
            break
        with autocast():
            logits = model(x.to(device))
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.to(device).view(-1), reduction="none")
        loss = loss.double().cpu()
        nats += float(loss.sum())
        tokens += y.numel()
        text, spelled = text_nats_and_bytes(loss, y.view(-1), byte_lengths)
        text_nats, nbytes = text_nats + float(text), nbytes + float(spelled)
    if not tokens:
        raise ValueError(f"the val split of {data_cfg.dir!r} holds no sequences (eval.heldout)")
    return {
        "loss": nats / tokens,
        "perplexity": math.exp(nats / tokens),
        "bpb": text_nats / math.log(2) / nbytes,
        "tokens": int(tokens),
    }
