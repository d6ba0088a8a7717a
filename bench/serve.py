"""`orch serve` under load: what continuous batching buys, what the HTTP layer costs, what int8 weights cost.

    python -m bench.serve --source runs/pretrain-1a2b3c     # a trained demo model (jobs/pretrain.yaml)
    python -m bench.serve --source ... --new-tokens 64      # quicker

One run, each ratio against a baseline measured in the same invocation:
  - batching: aggregate decode tokens/s of 8 concurrent streaming clients against 1 client, with p50/p99
    time to first token and inter-token latency (the gaps between streamed chunks);
  - HTTP: one streaming client of `orch serve` against in-process generation (model/generate.py's stream)
    of the same prompt, tokens/s after the first token;
  - int8: weight-only int8 (training/serve/precision.py) against bf16, decode tokens/s in process, and
    held-out bits per byte (the standard library's json/ and email/ packages, which the demo holds out).
The server is the real `orch serve` in its own process, driven over loopback with the standard library.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from bench.common import write_between_markers, write_result

REPO = Path(__file__).resolve().parents[1]


def held_out_text(max_bytes: int) -> str:
    """The standard library's json/ and email/ sources, which the demo's training split leaves out."""
    import email
    import json as json_pkg

    parts, size = [], 0
    for pkg in (json_pkg, email):
        for path in sorted(Path(pkg.__file__).parent.rglob("*.py")):
            text = path.read_text(errors="replace")
            parts.append(text)
            size += len(text.encode())
            if size >= max_bytes:
                return "".join(parts)[:max_bytes]
    return "".join(parts)


def bits_per_byte(model, tokenizer, text: str) -> float:
    """Summed next-token cross-entropy over the text in windows of the model's context, in bits per UTF-8 byte."""
    ids = tokenizer.encode(text).ids
    window = model.cfg.max_seq_len
    nats = 0.0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, window):
            chunk = torch.tensor([ids[start : start + window + 1]])
            nats += float(model(chunk[:, :-1], targets=chunk[:, 1:]))
    return nats / math.log(2) / len(text.encode())


def decode_rate(model, prompt: list[int], new_tokens: int) -> float:
    """In-process greedy decoding (model/generate.py's stream), tokens/s after the first token."""
    from model.generate import stream

    n, start = 0, None
    for _tok in stream(model, prompt, new_tokens, temperature=0):
        n += 1
        if n == 1:
            start = time.perf_counter()
    return (n - 1) / (time.perf_counter() - start)


class Served:
    def __init__(self, source: str, threads: int, max_batch: int):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "orchestrator.cli",
                "serve",
                source,
                "--port",
                str(self.port),
                "--threads",
                str(threads),
                "--max-batch",
                str(max_batch),
                "--served-model-name",
                "bench",
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for line in self.proc.stdout:
            if line.startswith("serving "):
                break
        for _ in range(600):
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("orch serve did not come up")

    def stream(self, prompt: str, max_tokens: int) -> dict:
        """One streamed completion: its chunk arrival times and the usage the server reports."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        body = {
            "model": "bench",
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        start = time.perf_counter()
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        r = conn.getresponse()
        assert r.status == 200, r.read()
        arrivals, usage = [], None
        for line in r:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            if any(c.get("text") for c in chunk["choices"]):
                arrivals.append(time.perf_counter())
        conn.close()
        return {"start": start, "arrivals": arrivals, "tokens": usage["completion_tokens"]}

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)


def load_round(server: Served, prompts: list[str], clients: int, rounds: int, new_tokens: int) -> dict:
    """`clients` threads, each streaming `rounds` completions back to back: aggregate tokens/s and latencies."""
    results: list[dict] = []
    lock = threading.Lock()

    def client(k: int) -> None:
        for r in range(rounds):
            out = server.stream(prompts[(k + r * clients) % len(prompts)], new_tokens)
            with lock:
                results.append(out)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ttft = [r["arrivals"][0] - r["start"] for r in results if r["arrivals"]]
    gaps = [b - a for r in results for a, b in zip(r["arrivals"], r["arrivals"][1:])]

    def pct(xs, q):  # nearest rank, in ms
        xs = sorted(xs)
        return 1000 * xs[min(len(xs) - 1, math.ceil(q / 100 * len(xs)) - 1)] if xs else float("nan")

    tokens = sum(r["tokens"] for r in results)
    return {
        "requests": len(results),
        "tokens": tokens,
        "seconds": wall,
        "tokens_per_s": tokens / wall,
        "ttft_p50_ms": pct(ttft, 50),
        "ttft_p99_ms": pct(ttft, 99),
        "itl_p50_ms": pct(gaps, 50),
        "itl_p99_ms": pct(gaps, 99),
    }


DOC = REPO / "docs" / "serving.md"


def table() -> str:
    """docs/serving.md's table, from the newest bench/results/serve-*.json."""
    from bench.common import newest_result

    record = newest_result("serve")
    if record is None:
        return "(no measurement yet: run `python -m bench.serve --source RUN`)"
    f, c = record["figures"], record["config"]
    rows = [
        "| measured | value | target |",
        "| --- | --- | --- |",
        f"| 8 streaming clients vs 1, aggregate decode tokens/s | {f['clients8_tokens_per_s']:.0f} vs "
        f"{f['clients1_tokens_per_s']:.0f} = {f['batching_speedup']:.2f}x | >= 4x |",
        f"| time to first token p50 / p99, 8 clients (1 client) | {f['clients8_ttft_p50_ms']:.0f} / "
        f"{f['clients8_ttft_p99_ms']:.0f} ms ({f['clients1_ttft_p50_ms']:.0f} / "
        f"{f['clients1_ttft_p99_ms']:.0f}) | |",
        f"| inter-token latency p50 / p99, 8 clients (1 client) | {f['clients8_itl_p50_ms']:.1f} / "
        f"{f['clients8_itl_p99_ms']:.1f} ms ({f['clients1_itl_p50_ms']:.1f} / {f['clients1_itl_p99_ms']:.1f}) | |",
        f"| one client over HTTP vs in-process generation, tokens/s | {f['http_tokens_per_s']:.0f} vs "
        f"{f['in_process_tokens_per_s']:.0f} = {f['http_vs_in_process']:.2f} | >= 0.9 |",
        f"| int8 vs bf16 weights, decode tokens/s (in process) | {f['int8_tokens_per_s']:.0f} vs "
        f"{f['bf16_tokens_per_s']:.0f} = {f['int8_speed_ratio']:.2f}x | |",
        f"| int8 vs bf16, held-out bits per byte | {f['int8_bpb']:.4f} vs {f['bf16_bpb']:.4f} "
        f"({100 * f['int8_bpb_change']:+.2f}%; fp32 {f['fp32_bpb']:.4f}) | within 1% |",
        "",
        f"{record['device']}, torch threads: {c['threads']}, {record['date']}; the model: "
        f"{c['model']['params'] / 1e6:.1f}M "
        f"parameters ({c['model']['n_layer']} layers, d_model {c['model']['d_model']}, context "
        f"{c['model']['max_seq_len']}), {c['new_tokens']} greedy tokens per completion, {c['rounds']} completions "
        f"per client; bits per byte over {c['heldout_bytes']:,} held-out bytes. {c.get('note', '')}".rstrip(),
    ]
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", help="a run, checkpoint or Hugging Face folder (the demo's run)")
    p.add_argument("--note", default="", help="a sentence on the model or the machine, kept in the result")
    p.add_argument("--docs", action="store_true", help="only fill docs/serving.md's table from bench/results/")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens per completion (greedy)")
    p.add_argument("--rounds", type=int, default=2, help="completions per client, back to back")
    p.add_argument("--repeats", type=int, default=3, help="best of N, the two sides of a ratio taking turns")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads, here and in the server (default 1: on a shared machine, OpenMP threads "
        "that wait for each other's core cost more than they bring)",
    )
    p.add_argument("--heldout-bytes", type=int, default=100_000)
    args = p.parse_args()
    if args.docs:
        return write_between_markers(DOC, "serve", table())
    if not args.source:
        p.error("--source is required (a trained run: the demo's, jobs/pretrain.yaml)")
    torch.set_num_threads(args.threads)

    from training.run_folder import load_model
    from training.serve.precision import prepare

    model, tok = load_model(args.source)
    text = held_out_text(args.heldout_bytes)
    # Prompts: the starts of held-out lines of code, so that completions run long.
    lines = [line for line in text.splitlines() if len(line.strip()) > 20]
    prompts = [lines[i * len(lines) // 16].rstrip()[:60] for i in range(16)]
    prompt_ids = tok.encode(prompts[0]).ids
    new_tokens = min(args.new_tokens, model.cfg.max_seq_len - 24)
    figures: dict = {}

    # Low precision, in process: bf16 vs bf16 weights as int8 (the baseline first, each best of N).
    import copy

    print("bits per byte and decoding rates in process: fp32, bf16, int8", file=sys.stderr, flush=True)
    bf16 = prepare(copy.deepcopy(model), "bf16")
    int8 = prepare(copy.deepcopy(model), "bf16", "int8")
    fp32_bpb = bits_per_byte(model, tok, text)
    bf16_bpb, int8_bpb = bits_per_byte(bf16, tok, text), bits_per_byte(int8, tok, text)
    decode_rate(bf16, prompt_ids, 8), decode_rate(int8, prompt_ids, 8)  # warm-up
    bf16_rate = int8_rate = 0.0
    for _ in range(args.repeats):  # taking turns: a change in the machine's load hits both sides
        bf16_rate = max(bf16_rate, decode_rate(bf16, prompt_ids, new_tokens))
        int8_rate = max(int8_rate, decode_rate(int8, prompt_ids, new_tokens))
    figures.update(
        fp32_bpb=fp32_bpb,
        bf16_bpb=bf16_bpb,
        int8_bpb=int8_bpb,
        int8_bpb_change=(int8_bpb - bf16_bpb) / bf16_bpb,
        bf16_tokens_per_s=bf16_rate,
        int8_tokens_per_s=int8_rate,
        int8_speed_ratio=int8_rate / bf16_rate,
    )
    del bf16, int8

    # The same prompt in process (fp32, the server's default) and through one HTTP client, taking turns.
    print("through orch serve: 1 client, then 8", file=sys.stderr, flush=True)
    server = Served(args.source, args.threads, max_batch=8)
    try:
        server.stream(prompts[0], 8)  # warm-up
        decode_rate(model, prompt_ids, 8)
        http_best = in_process = 0.0
        for _ in range(args.repeats):
            in_process = max(in_process, decode_rate(model, prompt_ids, new_tokens))
            r = server.stream(prompts[0], new_tokens)
            http_best = max(http_best, (r["tokens"] - 1) / (r["arrivals"][-1] - r["arrivals"][0]))
        figures.update(
            in_process_tokens_per_s=in_process, http_tokens_per_s=http_best, http_vs_in_process=http_best / in_process
        )
        one = load_round(server, prompts, 1, args.rounds, new_tokens)
        eight = load_round(server, prompts, 8, args.rounds, new_tokens)
    finally:
        server.stop()
    figures.update({f"clients1_{k}": v for k, v in one.items()})
    figures.update({f"clients8_{k}": v for k, v in eight.items()})
    figures["batching_speedup"] = eight["tokens_per_s"] / one["tokens_per_s"]
    cfg = model.cfg
    config = {
        "source": str(args.source),
        "model": {
            "n_layer": cfg.n_layer,
            "d_model": cfg.d_model,
            "n_head": cfg.n_head,
            "n_kv_head": cfg.n_kv_head,
            "vocab_size": cfg.vocab_size,
            "max_seq_len": cfg.max_seq_len,
            "params": model.num_params(),
        },
        "new_tokens": new_tokens,
        "rounds": args.rounds,
        "repeats": args.repeats,
        "threads": args.threads,
        "heldout_bytes": len(text.encode()),
        "server": "orch serve --max-batch 8 (fp32)",
        "device": "cpu",
        "note": args.note,
    }
    path = write_result("serve", config, figures)
    write_between_markers(DOC, "serve", table())
    print(
        f"8 clients vs 1: {eight['tokens_per_s']:.0f} vs {one['tokens_per_s']:.0f} tokens/s = "
        f"{figures['batching_speedup']:.2f}x; time to first token p50/p99 {eight['ttft_p50_ms']:.0f}/"
        f"{eight['ttft_p99_ms']:.0f} ms (1 client: {one['ttft_p50_ms']:.0f}/{one['ttft_p99_ms']:.0f}), "
        f"inter-token p50/p99 {eight['itl_p50_ms']:.1f}/{eight['itl_p99_ms']:.1f} ms "
        f"(1 client: {one['itl_p50_ms']:.1f}/{one['itl_p99_ms']:.1f})\n"
        f"HTTP vs in process: {http_best:.0f} vs {in_process:.0f} tokens/s = {figures['http_vs_in_process']:.2f}\n"
        f"int8 vs bf16: {int8_rate:.0f} vs {bf16_rate:.0f} tokens/s = {figures['int8_speed_ratio']:.2f}x; "
        f"bits/byte {int8_bpb:.4f} vs {bf16_bpb:.4f} ({100 * figures['int8_bpb_change']:+.2f}%; fp32 "
        f"{fp32_bpb:.4f})\nwrote {path}"
    )


if __name__ == "__main__":
    main()
