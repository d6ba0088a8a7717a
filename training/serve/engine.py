"""Continuous batching: the requests being served share one KV-cached forward pass per decode step.

One thread runs the model. Between two steps, requests that ended or were cancelled leave the batch and
waiting ones join it (up to max_batch): a joining prompt is read alone into a cache of its own (prefill),
then its keys and values are copied into the batch's cache. In the batch's cache each row is right-aligned
(left padding, hidden by the attention mask) and keeps its own rotary positions, so a request's tokens are
those model/generate.py gives it alone: greedy, or sampled with its own torch.Generator from the same seed.

    engine = Engine(model, tokenizer, max_batch=8); engine.start()
    engine.submit(Request(prompt_ids, Sampling(max_tokens=64, temperature=0), tokenizer, deliver=callback))
    ...                     # callback(Event) from the engine's thread: a text piece per token, the last
    engine.stop()           # one with finish_reason "stop" | "length" (| "abort" at shutdown, "error")
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from jobspec.faults import fault
from model.generate import sample_next
from training.serve.text import TextPieces

log = logging.getLogger("orch.serve")


class QueueFull(Exception):
    """Too many requests are waiting (or the server is shutting down): answer 429 and let the client retry."""


@dataclass(frozen=True)
class Sampling:
    max_tokens: int
    temperature: float = 1.0  # 0 = greedy
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    stop: tuple[str, ...] = ()  # stop strings (not shown)
    stop_tokens: tuple[int, ...] = ()  # stop tokens (not shown)
    logprobs: Optional[int] = None  # None: none; k: the sampled token's log-probability and the k likeliest
    seed: Optional[int] = None


@dataclass
class Event:
    """One sampled token of a request: the text it makes safe to show (maybe ""), and on the last one why it ended."""

    text: str
    token: Optional[int] = None
    logprob: Optional[float] = None
    top: Optional[list[tuple[int, float]]] = None
    finish_reason: Optional[str] = None


class Request:
    """One sequence to generate; `deliver` is called from the engine's thread with each Event."""

    def __init__(self, prompt: list[int], sampling: Sampling, tokenizer, deliver: Callable[[Event], None]):
        self.prompt, self.sampling, self.deliver = list(prompt), sampling, deliver
        self.generator = torch.Generator()
        if sampling.seed is not None:
            self.generator.manual_seed(sampling.seed)
        else:
            self.generator.seed()
        self.pieces = TextPieces(tokenizer, sampling.stop)
        self.generated = 0  # tokens sampled
        self.cached = 0  # tokens whose keys and values are in the cache
        self.pending: Optional[int] = None  # the last sampled token, fed at the next step
        self.cancelled = False
        self.finish_reason: Optional[str] = None


class Engine:
    def __init__(self, model, tokenizer, *, max_batch: int = 8, max_queue: int = 64):
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self.max_len = model.cfg.max_seq_len
        self.device = next(iter(model.parameters())).device
        self.cond = threading.Condition()
        self.waiting: deque[Request] = deque()
        self.rows: list[Request] = []  # the batch, in the cache's row order
        self.cache = None
        self.width = 0  # columns of the batch's cache in use: the longest row's cached tokens
        self.stopping = False
        self.thread: Optional[threading.Thread] = None
        self.decode_steps = 0  # forward passes over the batch (prefills not counted)
        self.largest_batch = 0

    # ---------------------------------------------------------------- called from other threads

    def submit(self, request: Request) -> None:
        with self.cond:
            if self.stopping:
                raise QueueFull("the server is shutting down")
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(
                    f"{len(self.rows)} requests are running and {len(self.waiting)} waiting "
                    f"(--max-batch {self.max_batch}, --max-queue {self.max_queue})"
                )
            self.waiting.append(request)
            self.cond.notify()

    def cancel(self, request: Request) -> None:
        """Free the request's place: it leaves the queue now, or the batch before the next step."""
        with self.cond:
            request.cancelled = True
            if request in self.waiting:
                self.waiting.remove(request)
            self.cond.notify()

    def load(self) -> dict:
        with self.cond:
            # running: the rows still wanted (a cancelled one leaves the batch before the next step)
            return {
                "running": sum(not r.cancelled for r in self.rows),
                "waiting": len(self.waiting),
                "max_batch": self.max_batch,
                "decode_steps": self.decode_steps,
                "largest_batch": self.largest_batch,
            }

    def start(self) -> "Engine":
        self.thread = threading.Thread(target=self._loop, name="orch-serve-engine", daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        """Stop after the current step; requests still running or waiting end with finish_reason "abort"."""
        with self.cond:
            self.stopping = True
            self.cond.notify()
        if self.thread is not None:
            self.thread.join()

    # ---------------------------------------------------------------- the engine's thread

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self.cond:
                while not (self.waiting or self.rows or self.stopping):
                    self.cond.wait()
                if self.stopping:
                    left = [*self.rows, *self.waiting]
                    self.rows, self.cache = [], None
                    self.waiting.clear()
                    break
                joining = []
                while self.waiting and len(self.rows) + len(joining) < self.max_batch:
                    joining.append(self.waiting.popleft())
            try:
                self._step(joining)
            except Exception:  # a failed step ends the requests in it, not the server
                log.exception("a decode step failed; its requests end with finish_reason 'error'")
                for r in {*self.rows, *joining}:
                    self._finish(r, "error")
                self.rows, self.cache, self.width = [], None, 0
        for r in left:
            self._finish(r, "abort")

    def _finish(self, r: Request, reason: str) -> None:
        if r.finish_reason is None:
            r.finish_reason = reason
            if not r.cancelled:
                r.deliver(Event(r.pieces.flush(), finish_reason=reason))

    def _step(self, joining: list[Request]) -> None:
        rows = [(r, self._row_kv(i)) for i, r in enumerate(self.rows) if not r.cancelled]
        changed = len(rows) != len(self.rows)
        for r in joining:
            if r.cancelled:
                continue
            prompt = torch.tensor([r.prompt], dtype=torch.long, device=self.device)
            cache = self.model.new_cache(len(r.prompt))
            logits = self.model(prompt, cache=cache)[:, -1]
            r.cached = len(r.prompt)
            if self._take(r, logits[0]):
                rows.append((r, [(layer.k[0], layer.v[0]) for layer in cache.layers]))
            changed = True
        if changed:
            self._rebuild(rows)
        if not self.rows:
            return
        self.largest_batch = max(self.largest_batch, len(self.rows))
        fault("serve.decode_step")
        tokens = torch.tensor([[r.pending] for r in self.rows], device=self.device)
        self.cache.length = self.width
        if all(r.cached == self.width for r in self.rows):  # no padding (one row, or rows in step): no mask
            logits = self.model(tokens, cache=self.cache)[:, -1]
        else:
            cached = torch.tensor([r.cached for r in self.rows], device=self.device)
            columns = torch.arange(self.width + 1, device=self.device)
            mask = (columns[None, :] >= (self.width - cached)[:, None])[:, None, None, :]  # False on padding
            logits = self.model(tokens, position_ids=cached[:, None], mask=mask, cache=self.cache)[:, -1]
        self.width += 1
        self.decode_steps += 1
        going = []
        for i, r in enumerate(self.rows):
            r.cached += 1
            if self._take(r, logits[i]):
                going.append(i)
        if len(going) < len(self.rows):
            self._rebuild([(self.rows[i], self._row_kv(i)) for i in going])

    def _row_kv(self, i: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Row i's cached keys and values per layer, [kv_heads, its cached tokens, head_dim]."""
        start = self.width - self.rows[i].cached
        return [(layer.k[i, :, start : self.width], layer.v[i, :, start : self.width]) for layer in self.cache.layers]

    def _rebuild(self, rows: list[tuple[Request, list]]) -> None:
        """A new batch cache holding these rows, right-aligned; padding is zeros (masked, and never NaN)."""
        self.rows = [r for r, _ in rows]
        if not rows:
            self.cache, self.width = None, 0
            return
        self.width = max(r.cached for r in self.rows)
        cache = self.model.new_cache()
        for n, layer in enumerate(cache.layers):
            k0 = rows[0][1][n][0]
            shape = (len(rows), k0.shape[0], self.max_len, k0.shape[2])
            layer.k, layer.v = k0.new_zeros(shape), k0.new_zeros(shape)
            for i, (r, kv) in enumerate(rows):
                layer.k[i, :, self.width - r.cached : self.width] = kv[n][0]
                layer.v[i, :, self.width - r.cached : self.width] = kv[n][1]
        self.cache = cache

    def _take(self, r: Request, logits: torch.Tensor) -> bool:
        """Sample r's next token from its logits [vocab] and hand it over; False when r has ended."""
        s = r.sampling
        token = int(sample_next(logits[None], s.temperature, s.top_k, s.top_p, r.generator)[0])
        r.generated += 1
        if r.cancelled:
            r.finish_reason = "cancelled"
            return False
        logprob = top = None
        if s.logprobs is not None:
            logp = logits.float().log_softmax(-1)
            logprob = float(logp[token])
            if s.logprobs > 0:
                values, ids = logp.topk(s.logprobs)
                top = list(zip(ids.tolist(), values.tolist()))
        finish = None
        if token in s.stop_tokens:
            text, finish = r.pieces.flush(), "stop"
        else:
            text = r.pieces.push(token)
            if r.pieces.stopped:
                finish = "stop"
            elif r.generated >= s.max_tokens or len(r.prompt) + r.generated >= self.max_len:
                text, finish = text + r.pieces.flush(), "length"
        r.finish_reason = finish
        r.deliver(Event(text, token, logprob, top, finish))
        if finish is not None:
            return False
        r.pending = token
        return True
