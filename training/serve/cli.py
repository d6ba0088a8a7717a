"""`orch serve SOURCE`: load a model and serve it over HTTP until SIGINT/SIGTERM.

    orch serve runs/sft-4d5e6f --port 8000 --max-batch 8
    orch serve hf/my-model --dtype bf16 --quantize int8 --api-key secret --served-model-name coder

On SIGINT/SIGTERM the server stops accepting connections, lets the requests in flight finish for up to
--shutdown-timeout seconds, then closes the rest.
"""

from __future__ import annotations

import sys
from pathlib import Path


def serve(args) -> int:
    """Run the server until SIGINT/SIGTERM (the arguments: training/tools/__init__.py)."""
    import torch
    import uvicorn

    from training.run_folder import load_model
    from training.serve.app import Model, create_app
    from training.serve.engine import Engine
    from training.serve.precision import prepare

    for flag, value in (("--max-batch", args.max_batch), ("--max-queue", args.max_queue)):
        if value < 1:
            raise ValueError(f"{flag} {value}: it must be at least 1")
    _check_address(args.host, args.port)  # before minutes of loading, not after
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.source, args.device)
    model = prepare(model, args.dtype, args.quantize)
    name = args.served_model_name or Path(args.source).resolve().name
    engine = Engine(model, tokenizer, max_batch=args.max_batch, max_queue=args.max_queue).start()
    app = create_app(Model(engine, tokenizer, name), api_key=args.api_key)
    _Server = _server_class()
    config = uvicorn.Config(
        app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=args.shutdown_timeout
    )
    print(
        f"serving {name} ({args.dtype}{', int8 weights' if args.quantize else ''}, max batch {args.max_batch}) "
        f"on http://{args.host}:{args.port}  (the chat page: /, the API: /v1)",
        file=sys.stderr,
        flush=True,
    )
    try:
        _Server(config).run()  # returns after SIGINT/SIGTERM, once connections have closed
    finally:
        engine.stop()
    print("server stopped", file=sys.stderr, flush=True)
    return 0


def _check_address(host: str, port: int) -> None:
    import socket

    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            s.bind((host, port))
    except OSError as e:
        raise ValueError(
            f"--host {host} --port {port}: can't listen there ({e.strerror}); choose another port"
        ) from None


def _server_class():
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            super().handle_exit(sig, frame)
            # uvicorn raises the signal again once it has shut down; a graceful stop is a clean exit here.
            self._captured_signals.clear()

    return Server
