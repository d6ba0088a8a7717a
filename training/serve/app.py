"""The HTTP app: OpenAI's /v1/models, /v1/completions and /v1/chat/completions over an Engine, streamed as
server-sent events the way OpenAI streams them, plus /health and the chat page at /.

Every error is OpenAI's error JSON with its status code: 400 for a bad body (not JSON, a wrong type, a prompt
longer than the context, max_tokens <= 0), 401 for a wrong API key, 404 for an unknown model or path, 429 with
Retry-After when the queue is full. A client that goes away mid-stream frees its place in the batch at once.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Optional

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from training.serve.engine import Engine, Event, QueueFull, Request, Sampling
from training.serve.openai_api import APIError, ChatRequest, CompletionRequest, new_id, now, parse, sse, usage

log = logging.getLogger("orch.serve")
PAGE = Path(__file__).with_name("page.html")


class Model:
    """What is served: the engine, the tokenizer and the name clients ask for."""

    def __init__(self, engine: Engine, tokenizer, name: str):
        from training.data.special_tokens import special_tokens

        self.engine, self.tokenizer, self.name = engine, tokenizer, name
        self.max_len = engine.max_len
        special = special_tokens(tokenizer)
        self.stops = special.stops  # the tokenizer folder's own end-of-sequence ids
        self.start = special.bos if special.bos is not None else special.eos

    def chat_ids(self, messages) -> tuple[list[int], tuple[int, ...]]:
        """(prompt ids in the chat template, stop tokens) of a conversation."""
        from training.data import DataError
        from training.posttrain.chat import encode_prompt, stop_ids

        turns = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]
        try:
            return encode_prompt(self.tokenizer, turns), tuple(stop_ids(self.tokenizer, chat=True))
        except DataError as e:
            raise APIError(400, f"this model can't chat: {e}", param="messages") from None

    def check_prompt(self, ids: list[int], max_tokens: Optional[int], param: str = "prompt") -> int:
        """The number of tokens to generate at most; a 400 if the prompt leaves no room for one."""
        if len(ids) >= self.max_len:
            raise APIError(
                400,
                f"This model's maximum context length is {self.max_len} tokens, but the prompt has "
                f"{len(ids)} tokens (at least one new token must fit)",
                param=param,
                code="context_length_exceeded",
            )
        if max_tokens is not None and max_tokens <= 0:
            raise APIError(400, f"'max_tokens' must be at least 1, got {max_tokens}", param="max_tokens")
        # More than the context holds ends at its edge with finish_reason "length", as `orch generate` does.
        return min(max_tokens or self.max_len, self.max_len - len(ids))

    def token_text(self, token: int) -> str:
        return self.tokenizer.decode([token], skip_special_tokens=False)


def create_app(served: Model, api_key: Optional[str] = None) -> FastAPI:
    app = FastAPI(title="orch serve", docs_url=None, redoc_url=None, openapi_url=None)
    engine = served.engine

    @app.exception_handler(APIError)
    async def api_error(_, e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(HTTPException)
    async def http_error(_, e: HTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(APIError(e.status_code, str(e.detail), type=kind).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def internal_error(_, e: Exception):
        log.exception("internal error")
        return JSONResponse(
            APIError(500, f"internal error: {type(e).__name__}", type="server_error").body(), status_code=500
        )

    @app.middleware("http")
    async def check_key(request: HTTPRequest, call_next):
        if (
            api_key
            and request.url.path.startswith("/v1/")
            and request.headers.get("authorization", "") != f"Bearer {api_key}"
        ):
            e = APIError(
                401,
                "Incorrect API key provided: pass it as 'Authorization: Bearer KEY' (--api-key)",
                code="invalid_api_key",
            )
            return JSONResponse(e.body(), status_code=401)
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "ok", **engine.load()}

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(PAGE.read_text())

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [
                {
                    "id": served.name,
                    "object": "model",
                    "created": now(),
                    "owned_by": "orch",
                    "max_model_len": served.max_len,
                }
            ],
        }

    @app.post("/v1/completions")
    async def completions(http: HTTPRequest):
        body = parse(await http.body(), CompletionRequest)
        _check_model(body.model)
        if body.echo or (body.best_of or 1) > 1:
            raise APIError(400, "'echo' and 'best_of' > 1 are not supported", param="echo" if body.echo else "best_of")
        prompts = _completion_prompts(body.prompt)
        budgets = [served.check_prompt(p, body.max_tokens) for p in prompts]
        seqs = [
            (p, _sampling(body, budget, served.stops, body.logprobs, seed_offset=j))
            for p, budget in zip(prompts, budgets)
            for j in range(body.n)
        ]
        return await _serve(http, body, seqs, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HTTPRequest):
        body = parse(await http.body(), ChatRequest)
        _check_model(body.model)
        ids, stops = served.chat_ids(body.messages)
        asked = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        budget = served.check_prompt(ids, asked, param="messages")
        top = (body.top_logprobs or 0) if body.logprobs else None
        seqs = [(ids, _sampling(body, budget, stops, top, seed_offset=j)) for j in range(body.n)]
        return await _serve(http, body, seqs, chat=True)

    def _check_model(name: str) -> None:
        if name != served.name:
            raise APIError(
                404,
                f"The model '{name}' does not exist: this server serves '{served.name}'",
                param="model",
                code="model_not_found",
            )

    def _completion_prompts(prompt) -> list[list[int]]:
        if isinstance(prompt, str):
            prompt = [prompt]
        if prompt and isinstance(prompt[0], int):
            prompt = [prompt]
        if not prompt:
            raise APIError(400, "'prompt' is empty", param="prompt")
        vocab = served.tokenizer.get_vocab_size()
        out = []
        for p in prompt:
            ids = served.tokenizer.encode(p).ids if isinstance(p, str) else list(p)
            if any(not 0 <= t < vocab for t in ids):
                raise APIError(400, f"'prompt' holds a token id outside the vocabulary [0, {vocab})", param="prompt")
            out.append(ids or [served.start])  # an empty prompt continues from BOS (else EOS)
        return out

    def _sampling(body, budget: int, stops: tuple[int, ...], logprobs: Optional[int], seed_offset: int) -> Sampling:
        return Sampling(
            max_tokens=budget,
            temperature=body.temperature,
            top_p=body.top_p if body.top_p < 1 else None,
            stop=body.stop_strings(),
            stop_tokens=stops,
            logprobs=logprobs,
            seed=None if body.seed is None else body.seed + seed_offset,
        )

    async def _serve(http: HTTPRequest, body, seqs: list[tuple[list[int], Sampling]], chat: bool):
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def deliver_to(i):
            def deliver(ev: Event) -> None:  # from the engine's thread
                try:
                    loop.call_soon_threadsafe(events.put_nowait, (i, ev))
                except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
                    pass

            return deliver

        requests = [Request(p, s, served.tokenizer, deliver_to(i)) for i, (p, s) in enumerate(seqs)]
        try:
            for r in requests:
                engine.submit(r)
        except QueueFull as e:
            for r in requests:
                engine.cancel(r)
            raise APIError(
                429,
                f"the server is busy: {e}; retry later",
                type="rate_limit_error",
                code="rate_limit_exceeded",
                headers={"Retry-After": "1"},
            ) from None
        prompt_tokens = sum(len(p) for p, _ in seqs[:: body.n])  # each prompt once, however many choices
        shape = _Shapes(served, chat, new_id("chatcmpl" if chat else "cmpl"))
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(
                _stream(requests, events, shape, prompt_tokens, include_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        try:
            choices = [_Choice() for _ in requests]
            left = len(requests)
            while left:
                i, ev = await events.get()
                choices[i].add(ev)
                left -= ev.finish_reason is not None
        finally:
            for r in requests:
                engine.cancel(r)  # a no-op for those that ended; frees the rest if this handler was cancelled
        completion_tokens = sum(c.count for c in choices)
        return {
            "id": shape.id,
            "object": "chat.completion" if chat else "text_completion",
            "created": now(),
            "model": served.name,
            "choices": [shape.choice(i, c) for i, c in enumerate(choices)],
            "usage": usage(prompt_tokens, completion_tokens),
        }

    async def _stream(requests, events, shape: "_Shapes", prompt_tokens: int, include_usage: bool):
        counts = [0] * len(requests)
        try:
            if shape.chat:
                for i in range(len(requests)):
                    yield sse(shape.chunk(i, {"role": "assistant", "content": ""}, include_usage=include_usage))
            left = len(requests)
            while left:
                i, ev = await events.get()
                counts[i] += ev.token is not None
                if ev.text or ev.logprob is not None:
                    yield sse(
                        shape.chunk(
                            i,
                            ev.text,
                            logprobs=shape.logprobs([ev]) if ev.logprob is not None else None,
                            include_usage=include_usage,
                        )
                    )
                if ev.finish_reason is not None:
                    left -= 1
                    yield sse(shape.chunk(i, "", finish_reason=ev.finish_reason, include_usage=include_usage))
            if include_usage:  # one last chunk: no choices, the usage of the whole request
                yield sse({**shape.chunk(0, ""), "choices": [], "usage": usage(prompt_tokens, sum(counts))})
            yield sse("[DONE]")
        finally:
            for r in requests:
                engine.cancel(r)  # the client went away (or the stream ended): free the batch's rows now

    return app


class _Choice:
    """One choice of a non-streamed response, gathered from its events."""

    def __init__(self):
        self.text, self.events, self.count, self.finish_reason = [], [], 0, None

    def add(self, ev: Event) -> None:
        self.text.append(ev.text)
        if ev.token is not None:
            self.count += 1
            self.events.append(ev)
        if ev.finish_reason is not None:
            self.finish_reason = ev.finish_reason


class _Shapes:
    """The JSON shapes of one response: a completion's or a chat completion's choices, chunks and logprobs."""

    def __init__(self, served: Model, chat: bool, id: str):
        self.served, self.chat, self.id, self.created = served, chat, id, now()

    def logprobs(self, events: list[Event]) -> Optional[dict]:
        events = [e for e in events if e.logprob is not None]
        if not events:
            return None
        text = self.served.token_text
        if self.chat:

            def entry(token, logprob):
                s = text(token)
                return {"token": s, "logprob": logprob, "bytes": list(s.encode())}

            return {
                "content": [
                    {**entry(e.token, e.logprob), "top_logprobs": [entry(t, lp) for t, lp in e.top or []]}
                    for e in events
                ]
            }
        tokens = [text(e.token) for e in events]
        offsets, at = [], 0
        for s in tokens:
            offsets.append(at)
            at += len(s)
        return {
            "tokens": tokens,
            "token_logprobs": [e.logprob for e in events],
            "top_logprobs": [{text(t): lp for t, lp in e.top or []} for e in events],
            "text_offset": offsets,
        }

    def choice(self, index: int, c: _Choice) -> dict:
        text = "".join(c.text)
        logprobs = self.logprobs(c.events)
        if self.chat:
            return {
                "index": index,
                "message": {"role": "assistant", "content": text},
                "logprobs": logprobs,
                "finish_reason": c.finish_reason,
            }
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": c.finish_reason}

    def chunk(
        self,
        index: int,
        delta,
        *,
        finish_reason: Optional[str] = None,
        logprobs: Optional[dict] = None,
        include_usage: bool = False,
    ) -> dict:
        if self.chat:
            delta = delta if isinstance(delta, dict) else ({"content": delta} if delta else {})
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        else:
            choice = {"index": index, "text": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        out = {
            "id": self.id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self.served.name,
            "choices": [choice],
        }
        if include_usage:
            out["usage"] = None  # as OpenAI: present and null in every chunk but the last
        return out
