"""`orch generate` and `orch chat`: sample from a run, a checkpoint or a Hugging Face folder, streaming
text to the terminal as tokens come.

    orch generate runs/pretrain-1a2b3c --prompt "def parse(line):" --max-new-tokens 100 --stop "\\ndef "
    orch chat runs/sft-4d5e6f              # the model folder's own chat template; empty line or Ctrl-D ends
"""

from __future__ import annotations

import sys


def add_sampling_args(p, source_optional: bool = False) -> None:
    p.add_argument(
        "source",
        nargs="?" if source_optional else None,
        help="a run folder (its newest checkpoint), a checkpoint folder or a Hugging Face folder",
    )
    p.add_argument("--max-new-tokens", type=int, default=256, help="stop after this many tokens (default 256)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    p.add_argument(
        "--top-p", type=float, default=None, help="sample among the most likely tokens holding this much probability"
    )
    p.add_argument(
        "--stop",
        action="append",
        default=[],
        metavar="STR",
        help="stop before this text (repeatable; \\n and \\t are understood)",
    )
    p.add_argument("--seed", type=int, default=None, help="for reproducible sampling")
    p.add_argument("--device", default="cpu", help="cpu or cuda")


def _unescape(s: str) -> str:
    return s.replace("\\n", "\n").replace("\\t", "\t")


def _sampling(args) -> dict:
    import torch

    if args.temperature < 0:
        raise ValueError(f"--temperature {args.temperature}: it must be 0 (greedy) or more")
    if args.top_k is not None and args.top_k < 1:
        raise ValueError(f"--top-k {args.top_k}: it must be at least 1")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p {args.top_p}: it must be in (0, 1]")
    generator = torch.Generator(args.device).manual_seed(args.seed) if args.seed is not None else None
    return {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p, "generator": generator}


def _load(args):
    from training.run_folder import load_model

    return load_model(args.source, args.device)


def _print_stream(text_stream) -> str:
    out = []
    for piece in text_stream:
        sys.stdout.write(piece)
        sys.stdout.flush()
        out.append(piece)
    return "".join(out)


def cmd_generate(args) -> int:
    from model.generate import TextStream
    from training.data.special_tokens import special_tokens

    model, tokenizer = _load(args)
    prompt = _unescape(args.prompt)
    special = special_tokens(tokenizer)  # the tokenizer folder's own ids
    ids = tokenizer.encode(prompt).ids or [special.bos if special.bos is not None else special.eos]
    ids = ids[-(model.cfg.max_seq_len - 1) :]  # keep the end of a prompt longer than the model's window
    sys.stdout.write(prompt)
    text_stream = TextStream(
        model,
        tokenizer,
        ids,
        args.max_new_tokens,
        stop=[_unescape(s) for s in args.stop],
        stop_tokens=list(special.stops),
        **_sampling(args),
    )
    _print_stream(text_stream)
    sys.stdout.write("\n")
    print(f"[{len(text_stream.token_ids)} tokens, stopped by {text_stream.stop_reason}]", file=sys.stderr)
    return 0


def cmd_chat(args) -> int:
    from model.generate import TextStream
    from training.posttrain.chat import encode_prompt, stop_ids

    if args.url:
        from training.serve.client import chat_remote

        return chat_remote(args, _unescape)
    if not args.source:
        raise ValueError("orch chat needs a SOURCE folder to load, or --url of a running `orch serve`")
    model, tokenizer = _load(args)
    stops = stop_ids(tokenizer, chat=True)
    sampling = _sampling(args)
    messages: list[dict] = []
    print(f"chatting with {args.source} (empty line or Ctrl-D to quit)", file=sys.stderr)
    while True:
        try:
            said = input("you> ")
        except EOFError:
            break
        if not said.strip():
            break
        messages.append({"role": "user", "content": said})
        ids = encode_prompt(tokenizer, messages)
        while len(ids) >= model.cfg.max_seq_len and len(messages) > 1:  # forget the oldest turns first
            messages = messages[2:] if len(messages) > 2 else messages[1:]
            ids = encode_prompt(tokenizer, messages)
        ids = ids[-(model.cfg.max_seq_len - 1) :]
        sys.stdout.write("model> ")
        reply = _print_stream(
            TextStream(
                model,
                tokenizer,
                ids,
                args.max_new_tokens,
                stop=[_unescape(s) for s in args.stop],
                stop_tokens=stops,
                **sampling,
            )
        )
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": reply})
    return 0
