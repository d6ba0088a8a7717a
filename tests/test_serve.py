"""`orch serve`: the real server process on a free loopback port, driven by the official `openai` client.

The model is built here in a second: a tiny GPT whose one checkpoint sits in a run folder as the trainer
leaves it, with a byte-level tokenizer trained on a few lines. The batching engine is also checked in process:
each request gets the tokens that model/generate.py gives it alone."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import REPO, env_for

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

TEXTS = [
    "def main():\n    print('hello, world')\n",
    "for i in range(10):\n    total += i * i\n",
    "The quick brown fox jumps over the lazy dog.\n",
    "import os\nimport sys\n",
]
MAX_LEN = 256


def make_run(root: Path) -> Path:
    """A run folder with one checkpoint of a random tiny chat model; sharp logits, so greedy ties can't flip."""
    from model.config import GPTConfig
    from model.gpt import GPT
    from training.checkpoint import save_checkpoint
    from training.data.tokenizer import train_tokenizer

    run = root / "tiny-chat"
    run.mkdir(parents=True)
    tok = train_tokenizer(TEXTS * 4, vocab_size=300)
    tok.save(str(run / "tokenizer.json"))
    section = dict(
        vocab_size=320, n_layer=2, n_head=4, n_kv_head=2, d_model=64, max_seq_len=MAX_LEN, tie_embeddings=False
    )
    model = GPT(GPTConfig(**section))
    model.init_weights(seed=3)
    with torch.no_grad():
        model.output.weight.mul_(20)
    (run / "config.yaml").write_text(yaml.safe_dump({"kind": "sft", "model": section, "data": {"tokenizer": None}}))
    opt = torch.optim.AdamW(model.parameters())
    save_checkpoint(run, 1, model, opt, {"step": 1, "tokens_seen": 0})
    return run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("serve"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`orch serve` in a process of its own; ready once /health answers."""

    def __init__(self, run: Path, *args: str, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "orchestrator.cli",
                "serve",
                str(run),
                "--port",
                str(self.port),
                "--threads",
                "1",
                *args,
            ],
            cwd=run.parent,
            env={**env_for(run.parent), **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        # The server says where it listens once the model is loaded; then /health answers.
        for line in self.proc.stdout:
            if line.startswith("serving "):
                break
        else:
            raise AssertionError(f"orch serve exited with {self.proc.wait()}")
        for _ in range(200):  # uvicorn binds right after that line
            try:
                assert self.get("/health")[0] == 200
                break
            except OSError:
                if self.proc.poll() is not None:
                    raise AssertionError(f"orch serve exited with {self.proc.returncode}")
                threading.Event().wait(0.05)

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        conn.request(method, path, body=body, headers=headers or {"Content-Type": "application/json"})
        r = conn.getresponse()
        data = r.read()
        conn.close()
        return r.status, json.loads(data) if data else None, {k.lower(): v for k, v in r.getheaders()}

    def get(self, path: str):
        return self.request("GET", path)

    def client(self, **kw):
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=kw.pop("api_key", "none"), max_retries=0, **kw)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=60)
        finally:
            self.proc.stdout.close()


@pytest.fixture(scope="module")
def server(run_dir):
    s = Server(run_dir, "--max-batch", "4", "--max-queue", "8", "--served-model-name", "tiny")
    yield s
    assert s.stop() == 0


@pytest.fixture(scope="module")
def local(run_dir):
    """The same model and tokenizer in this process, for reference generations."""
    from training.run_folder import load_model

    torch.set_num_threads(1)
    return load_model(run_dir)


def alone(local, prompt_ids: list[int], n: int, stop_tokens=(0,), **sampling) -> list[int]:
    from model.generate import generate

    model, _ = local
    return generate(model, [prompt_ids], n, stop_tokens=stop_tokens, **sampling)[0]


def chat_prompt(local, messages) -> list[int]:
    from training.posttrain.chat import encode_prompt

    return encode_prompt(local[1], messages)


# ---------------------------------------------------------------- the batching engine, in process


def test_concurrent_requests_share_decode_steps_and_get_their_own_tokens(local):
    """Requests joining and leaving a batch of 3 get exactly the tokens generate() gives each alone."""
    from training.serve.engine import Engine, Request, Sampling

    model, tok = local
    prompts = [tok.encode(t).ids for t in ("def main", "import os\nimport", "for i in", "The quick brown fox")]
    specs = [(p, Sampling(max_tokens=12 + 5 * i, temperature=0)) for i, p in enumerate(prompts)]
    specs += [(p, Sampling(max_tokens=30, temperature=1.3, top_p=0.95, seed=i)) for i, p in enumerate(prompts)]
    engine = Engine(model, tok, max_batch=3).start()
    got = [[] for _ in specs]
    finished = threading.Semaphore(0)

    def deliver(i):
        def take(ev):
            got[i].append(ev.token)
            if ev.finish_reason:
                finished.release()

        return take

    try:
        for i, (p, s) in enumerate(specs):
            engine.submit(Request(p, s, tok, deliver(i)))
        for _ in specs:
            assert finished.acquire(timeout=60)
    finally:
        engine.stop()
    for (p, s), tokens in zip(specs, got):
        gen = torch.Generator().manual_seed(s.seed) if s.seed is not None else None
        assert tokens == alone(
            local, p, s.max_tokens, stop_tokens=(), temperature=s.temperature, top_p=s.top_p, generator=gen
        )
    assert engine.largest_batch == 3
    assert engine.decode_steps < sum(len(t) for t in got) / 2  # steps were shared


# ---------------------------------------------------------------- the server, through the openai client


def test_models_health_and_the_chat_page(server):
    client = server.client()
    assert [m.id for m in client.models.list().data] == ["tiny"]
    status, body, _ = server.get("/health")
    assert status == 200 and body["status"] == "ok" and body["max_batch"] == 4
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("GET", "/")
    page = conn.getresponse().read().decode()
    assert "/v1/chat/completions" in page and "<script" in page and "src=" not in page  # inline, no CDN


def test_completion_is_what_generate_gives_streamed_or_not(server, local):
    client = server.client()
    ids = local[1].encode("def main").ids
    expected = alone(local, ids, 20, temperature=0)
    text = local[1].decode([t for t in expected if t != 0])
    r = client.completions.create(model="tiny", prompt="def main", max_tokens=20, temperature=0)
    assert r.choices[0].text == text
    assert r.choices[0].finish_reason == ("stop" if expected[-1] == 0 else "length")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (
        len(ids),
        len(expected),
        len(ids) + len(expected),
    )
    chunks = list(
        client.completions.create(
            model="tiny",
            prompt="def main",
            max_tokens=20,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert [c.usage is not None for c in chunks] == [False] * (len(chunks) - 1) + [True]  # usage once, last
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(expected)
    plain = list(client.completions.create(model="tiny", prompt="def main", max_tokens=20, temperature=0, stream=True))
    assert all(c.usage is None and c.choices for c in plain)  # not asked for: no usage chunk


def test_chat_uses_the_chat_template_streamed_or_not(server, local):
    from training.data.tokenizer import IM_END_ID

    client = server.client()
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "write a loop"}]
    ids = chat_prompt(local, messages)
    expected = alone(local, ids, 30, stop_tokens=(0, IM_END_ID), temperature=0)
    text = local[1].decode([t for t in expected if t not in (0, IM_END_ID)])
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=30, temperature=0)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == text
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(expected)
    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=messages,
            max_tokens=30,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-2].choices[0].finish_reason == r.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == r.usage.total_tokens


def test_seed_n_stop_and_logprobs(server, local):
    model, tok = local
    client = server.client()
    ids = tok.encode("import os").ids
    r = client.completions.create(
        model="tiny", prompt="import os", max_tokens=25, temperature=1.0, seed=11, n=2, logprobs=2
    )
    for j, choice in enumerate(r.choices):  # choice j samples with seed + j, as generate() alone would
        expected = alone(local, ids, 25, temperature=1.0, generator=torch.Generator().manual_seed(11 + j))
        assert choice.text == tok.decode([t for t in expected if t != 0])
        assert len(choice.logprobs.token_logprobs) == len(expected)
    assert r.choices[0].text != r.choices[1].text
    # The first token's log-probability is the model's own.
    with torch.no_grad():
        logp = model(torch.tensor([ids]))[0, -1].log_softmax(-1)
    first = alone(local, ids, 1, temperature=1.0, generator=torch.Generator().manual_seed(11))[0]
    assert r.choices[0].logprobs.token_logprobs[0] == pytest.approx(float(logp[first]), abs=1e-4)
    assert len(r.choices[0].logprobs.top_logprobs[0]) <= 2
    again = client.completions.create(model="tiny", prompt="import os", max_tokens=25, temperature=1.0, seed=11)
    assert again.choices[0].text == r.choices[0].text
    # A stop string ends the text before it.
    greedy = client.completions.create(model="tiny", prompt="import os", max_tokens=30, temperature=0).choices[0].text
    at = max(i for i in range(1, len(greedy) - 1) if greedy.find(greedy[i : i + 2]) == i)
    stopped = client.completions.create(
        model="tiny", prompt="import os", max_tokens=30, temperature=0, stop=[greedy[at : at + 2]]
    )
    assert stopped.choices[0].text == greedy[:at] and stopped.choices[0].finish_reason == "stop"


def test_concurrent_http_clients_are_batched_and_each_gets_its_own_answer(server, local):
    from concurrent.futures import ThreadPoolExecutor

    client = server.client()
    prompts = ["def main", "import os", "for i in", "The quick", "print(", "total +=", "hello", "x = 1"]
    before = server.get("/health")[1]["decode_steps"]
    with ThreadPoolExecutor(8) as pool:
        texts = list(
            pool.map(
                lambda p: (
                    client.completions.create(model="tiny", prompt=p, max_tokens=40, temperature=0).choices[0].text
                ),
                prompts,
            )
        )
    for p, text in zip(prompts, texts):
        assert text == local[1].decode([t for t in alone(local, local[1].encode(p).ids, 40, temperature=0) if t != 0])
    health = server.get("/health")[1]
    assert health["largest_batch"] > 1
    assert health["decode_steps"] - before < 8 * 39  # fewer forward passes than one per request per token


def test_errors_are_openai_errors_and_the_server_goes_on(server):
    client = server.client()
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt="hi")
    assert e.value.code == "model_not_found" and e.value.param == "model"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="x " * 300)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=0)
    assert e.value.param == "max_tokens"
    for raw, param in (
        (b"{not json", None),
        (b"[1, 2]", None),
        (b'{"model": "tiny", "prompt": "a", "max_tokens": "x"}', "max_tokens"),
        (b'{"model": "tiny", "prompt": "a", "temperature": 9}', "temperature"),
        (b'{"model": "tiny"}', "prompt"),
        (b'{"model": "tiny", "prompt": [99999]}', "prompt"),
    ):
        status, body, _ = server.request("POST", "/v1/completions", raw)
        assert status == 400 and body["error"]["type"] == "invalid_request_error", (raw, body)
        assert body["error"]["param"] == param and body["error"]["message"]
    status, body, _ = server.request("POST", "/v1/chat/completions", b'{"model": "tiny", "messages": []}')
    assert status == 400 and body["error"]["param"] == "messages"
    status, body, _ = server.get("/v1/nothing")
    assert status == 404 and body["error"]["message"]
    # max_tokens past the context: served, ending at its edge.
    r = client.completions.create(model="tiny", prompt="def", max_tokens=10**9, temperature=0)
    assert r.usage.total_tokens <= MAX_LEN and r.choices[0].finish_reason in ("stop", "length")
    assert client.completions.create(model="tiny", prompt="def", max_tokens=3).usage.completion_tokens <= 3


def test_orch_chat_url_talks_to_the_server(server, local):
    from training.data.tokenizer import IM_END_ID

    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "orchestrator.cli",
            "chat",
            "--url",
            server.url,
            "--temperature",
            "0",
            "--max-new-tokens",
            "12",
        ],
        input="write a loop\n\n",
        capture_output=True,
        text=True,
        env=env_for(REPO),
        cwd=REPO,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    expected = alone(
        local,
        chat_prompt(local, [{"role": "user", "content": "write a loop"}]),
        12,
        stop_tokens=(0, IM_END_ID),
        temperature=0,
    )
    assert r.stdout == "you> model> " + local[1].decode([t for t in expected if t not in (0, IM_END_ID)]) + "\nyou> "


def open_stream(port: int, body: dict, headers: dict) -> socket.socket:
    """A streamed request on a raw socket, so that the test decides when the client goes away."""
    raw = json.dumps({**body, "stream": True}).encode()
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    sock.sendall(
        f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{head}"
        f"Content-Length: {len(raw)}\r\n\r\n".encode()
        + raw
    )
    return sock


def read_until(sock: socket.socket, marker: bytes) -> bytes:
    data = b""
    while marker not in data:
        piece = sock.recv(65536)
        assert piece, data
        data += piece
    return data


@pytest.mark.slow  # a server of its own
def test_bad_clients_never_stop_the_server(run_dir, tmp_path):
    """A wrong API key, a client that disconnects mid-stream (its place frees at once), 100 clients at once
    (served or refused with 429 and Retry-After), raw garbage: each answered, then a normal request is served."""
    release = tmp_path / "release"
    # The engine holds at its 3rd decode step until `release` exists: the streaming client goes away meanwhile.
    s = Server(
        run_dir,
        "--max-batch",
        "1",
        "--max-queue",
        "2",
        "--api-key",
        "secret",
        "--served-model-name",
        "tiny",
        env={"ORCH_FAULT": "serve.decode_step#3:wait", "ORCH_FAULT_RELEASE": str(release)},
    )
    key = {"Authorization": "Bearer secret"}
    try:
        with pytest.raises(openai.AuthenticationError):
            s.client(api_key="wrong").models.list()
        status, body, _ = s.request("POST", "/v1/completions", b"{}")
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
        assert s.get("/health")[0] == 200  # health needs no key

        # A stream of up to 90 tokens; the client reads its first token and leaves while the engine is held.
        sock = open_stream(
            s.port, {"model": "tiny", "prompt": "def", "max_tokens": 90, "temperature": 0, "logprobs": 0}, key
        )  # logprobs: a chunk for every token
        read_until(sock, b'"text"')
        waiting = threading.Thread(
            target=lambda: out.append(
                s.client(api_key="secret").completions.create(
                    model="tiny", prompt="import", max_tokens=5, temperature=0
                )
            )
        )
        out: list = []
        waiting.start()
        for _ in range(400):  # bounded: until the second request is queued behind the first
            if s.get("/health")[1]["waiting"] == 1:
                break
            threading.Event().wait(0.05)
        assert s.get("/health")[1]["waiting"] == 1
        sock.close()
        for _ in range(400):  # bounded: until the server has seen the client go (the engine is still held)
            if s.get("/health")[1]["running"] == 0:
                break
            threading.Event().wait(0.05)
        assert s.get("/health")[1]["running"] == 0
        release.touch()
        waiting.join(timeout=60)
        assert out and out[0].usage.completion_tokens <= 5
        health = s.get("/health")[1]
        # The first request left at the held step, not after its 90 tokens; 4 steps for the second.
        assert health["decode_steps"] <= 3 + 4 and health["running"] == 0 and health["waiting"] == 0

        # 100 clients at once: each served, or refused in OpenAI's shape with a Retry-After.
        from concurrent.futures import ThreadPoolExecutor

        body = json.dumps({"model": "tiny", "prompt": "for", "max_tokens": 20, "temperature": 0}).encode()
        with ThreadPoolExecutor(100) as pool:
            answers = list(
                pool.map(
                    lambda _: s.request("POST", "/v1/completions", body, {**key, "Content-Type": "application/json"}),
                    range(100),
                )
            )
        statuses = [a[0] for a in answers]
        assert set(statuses) <= {200, 429} and statuses.count(200) >= 3, statuses
        for status, body_, headers in answers:
            if status == 429:
                assert body_["error"]["code"] == "rate_limit_exceeded" and headers["retry-after"] == "1"
        # Garbage that isn't HTTP at all.
        with socket.create_connection(("127.0.0.1", s.port), timeout=30) as sock:
            sock.sendall(b"\x00\xffnot http at all\r\n\r\n")
            sock.recv(1024)
        r = s.client(api_key="secret").completions.create(model="tiny", prompt="def", max_tokens=4, temperature=0)
        assert r.usage.completion_tokens >= 1
    finally:
        release.touch()
        assert s.stop() == 0


@pytest.mark.slow  # a server of its own
def test_shutdown_lets_the_stream_in_flight_finish(run_dir, tmp_path):
    release = tmp_path / "release"
    s = Server(
        run_dir,
        "--served-model-name",
        "tiny",
        env={"ORCH_FAULT": "serve.decode_step#2:wait", "ORCH_FAULT_RELEASE": str(release)},
    )
    try:
        sock = open_stream(
            s.port, {"model": "tiny", "prompt": "def", "max_tokens": 30, "temperature": 0, "logprobs": 0}, {}
        )
        read_until(sock, b'"text"')  # the first token came; the engine is held at its 2nd decode step
        s.proc.send_signal(signal.SIGTERM)
        release.touch()
        data = read_until(sock, b"data: [DONE]")
        sock.close()
        assert b'"finish_reason": "length"' in data or b'"finish_reason": "stop"' in data
        assert s.proc.wait(timeout=60) == 0
    finally:
        release.touch()
        s.stop()


class Browser:
    """Headless Chromium driven over the DevTools protocol on a pipe (--remote-debugging-pipe: JSON messages
    separated by NUL bytes on its file descriptors 3 and 4), the way a person would use the page: type, Enter."""

    def __init__(self, profile: Path):
        commands_r, self._commands = os.pipe()
        self._replies, replies_w = os.pipe()

        def as_fds_3_and_4():  # in the child, before it closes every descriptor but 0-2 and pass_fds
            high_r, high_w = os.dup(commands_r), os.dup(replies_w)  # neither may clobber the other
            os.dup2(high_r, 3)
            os.dup2(high_w, 4)

        self.proc = subprocess.Popen(
            [
                "chromium",
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--remote-debugging-pipe",
                f"--user-data-dir={profile}",
                "about:blank",
            ],
            pass_fds=(3, 4),
            preexec_fn=as_fds_3_and_4,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(commands_r)
        os.close(replies_w)
        self._buf, self._n, self.session = b"", 0, None

    def call(self, method: str, **params):
        self._n += 1
        message = {"id": self._n, "method": method, "params": params}
        if self.session:
            message["sessionId"] = self.session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        while True:
            while b"\0" not in self._buf:
                piece = os.read(self._replies, 65536)
                assert piece, "chromium closed its pipe"
                self._buf += piece
            line, _, self._buf = self._buf.partition(b"\0")
            reply = json.loads(line)
            if reply.get("id") == self._n:
                assert "error" not in reply, reply
                return reply["result"]

    def open(self, url: str) -> None:
        target = self.call("Target.createTarget", url=url)["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]

    def js(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def wait_for(self, expression: str, tries: int = 600) -> None:
        for _ in range(tries):  # bounded: about a minute
            if self.js(expression):
                return
            threading.Event().wait(0.1)
        raise AssertionError(f"the page never had {expression}: {self.js('document.body.innerText')!r}")

    def type_and_enter(self, selector: str, text: str) -> None:
        self.wait_for(f"document.readyState == 'complete' && !!document.querySelector({selector!r})")
        self.js(f"document.querySelector({selector!r}).focus()")
        self.call("Input.insertText", text=text)
        assert self.js(f"document.querySelector({selector!r}).value") == text
        for kind in ("keyDown", "keyUp"):
            self.call(
                "Input.dispatchKeyEvent",
                type=kind,
                key="Enter",
                code="Enter",
                windowsVirtualKeyCode=13,
                **({"text": "\r"} if kind == "keyDown" else {}),
            )

    def close(self) -> None:
        try:
            os.write(self._commands, json.dumps({"id": 0, "method": "Browser.close"}).encode() + b"\0")
        except BrokenPipeError:  # it had already gone
            pass
        try:
            self.proc.wait(timeout=30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            os.close(self._commands)
            os.close(self._replies)


@pytest.mark.slow  # a browser
@pytest.mark.skipif(not shutil.which("chromium"), reason="chromium is not installed (apt-get install -y chromium)")
def test_the_chat_page_streams_an_answer_and_keeps_the_conversation(server, local, tmp_path):
    from training.data.tokenizer import IM_END_ID

    browser = Browser(tmp_path / "profile")
    try:
        browser.open(server.url + "/")
        browser.wait_for("document.readyState == 'complete' && !!document.getElementById('temperature')")
        browser.js(
            "document.getElementById('temperature').value = '0';document.getElementById('max_tokens').value = '20'"
        )
        browser.type_and_enter("#say", "write a loop")
        browser.wait_for("document.querySelectorAll('.assistant[data-done]').length == 1")
        browser.type_and_enter("#say", "and another")
        browser.wait_for("document.querySelectorAll('.assistant[data-done]').length == 2")
        answers = browser.js("[...document.querySelectorAll('.assistant')].map(e => e.textContent)")
        said = browser.js("[...document.querySelectorAll('.user')].map(e => e.textContent)")
        stats = browser.js("document.getElementById('stats').textContent")
    finally:
        browser.close()
    messages = [{"role": "user", "content": "write a loop"}]
    expected = []
    for turn in ("write a loop", "and another"):  # the second turn is asked with the first in its prompt
        if turn != "write a loop":
            messages += [{"role": "assistant", "content": expected[-1]}, {"role": "user", "content": turn}]
        out = alone(local, chat_prompt(local, messages), 20, stop_tokens=(0, IM_END_ID), temperature=0)
        expected.append(local[1].decode([t for t in out if t not in (0, IM_END_ID)]))
    assert said == ["write a loop", "and another"]
    assert answers == expected
    assert "tokens/s" in stats


def test_the_docs_table_is_the_newest_benchmark_result():
    from bench.serve import DOC, table

    between = DOC.read_text().split("<!-- serve -->\n", 1)[1].split("\n<!-- /serve -->", 1)[0]
    assert between == table(), "docs/serving.md's table: run `python -m bench.serve --docs`"


def test_int8_weights_are_a_quarter_of_the_bytes_and_barely_move_the_logits(local):
    import copy

    from training.serve.precision import Int8Linear, prepare

    model = local[0]
    tokens = torch.tensor([local[1].encode("for i in range(10):\n    total += i").ids])
    with torch.no_grad():
        ref = model(tokens).log_softmax(-1)
        for dtype in ("fp32", "bf16"):
            q = prepare(copy.deepcopy(model), dtype, "int8")
            linears = [m for m in q.modules() if isinstance(m, Int8Linear)]
            assert len(linears) == 7 * model.cfg.n_layer + 1  # q, k, v, o, w1, w2, w3 per block; the head
            assert all(m.weight_int8.dtype == torch.int8 for m in linears)
            got = q(tokens).float().log_softmax(-1)
            # The same next-token distribution within a few hundredths of a nat.
            assert (got.exp() * (got - ref)).sum(-1).abs().max() < 0.05
        assert prepare(copy.deepcopy(model), "bf16").output.weight.dtype == torch.bfloat16
