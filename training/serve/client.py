"""`orch chat --url`: the chat loop of `orch chat`, talking to a running OpenAI-compatible server over HTTP
(/v1/chat/completions, streamed) instead of loading a model. Standard library only."""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from typing import Iterator, Optional


class RemoteError(RuntimeError):
    """The server refused or could not be reached; the message is the server's own error message."""


def _call(url: str, api_key: Optional[str], body: Optional[dict] = None):
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    data = None if body is None else json.dumps(body).encode()
    try:
        return urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers), timeout=600)
    except urllib.error.HTTPError as e:
        try:
            message = json.loads(e.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = e.reason
        raise RemoteError(f"{url}: {e.code} {message}") from None
    except urllib.error.URLError as e:
        raise RemoteError(f"{url}: can't connect ({e.reason}); is `orch serve` running there?") from None


def served_model(base: str, api_key: Optional[str]) -> str:
    with _call(f"{base}/v1/models", api_key) as r:
        return json.loads(r.read())["data"][0]["id"]


def stream_chat(base: str, api_key: Optional[str], body: dict) -> Iterator[str]:
    """The reply's text pieces as the server streams them."""
    with _call(f"{base}/v1/chat/completions", api_key, {**body, "stream": True}) as r:
        for line in r:
            line = line.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for choice in json.loads(line[6:]).get("choices", []):
                piece = choice.get("delta", {}).get("content")
                if piece:
                    yield piece


def chat_remote(args, unescape) -> int:
    base = args.url.rstrip("/")
    if base.endswith("/v1"):
        base = base[:-3]
    model = served_model(base, args.api_key)
    body = {
        "model": model,
        "max_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "stop": [unescape(s) for s in args.stop] or None,
    }
    if args.top_p is not None:
        body["top_p"] = args.top_p
    if args.seed is not None:
        body["seed"] = args.seed
    messages: list[dict] = []
    print(f"chatting with {model} at {base} (empty line or Ctrl-D to quit)", file=sys.stderr)
    while True:
        try:
            said = input("you> ")
        except EOFError:
            break
        if not said.strip():
            break
        messages.append({"role": "user", "content": said})
        sys.stdout.write("model> ")
        reply = []
        for piece in stream_chat(base, args.api_key, {**body, "messages": messages}):
            sys.stdout.write(piece)
            sys.stdout.flush()
            reply.append(piece)
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": "".join(reply)})
    return 0
