"""The data plane's commands that `orch` runs in the user's own process: the second entry point into
training/, beside training/main.py (the trainer). orchestrator/cli.py imports this module alone, lazily.

    orch generate SOURCE --prompt ...    sample.py: stream a continuation
    orch chat SOURCE | --url URL         sample.py: talk to a fine-tuned model in its chat format (or to a server)
    orch serve SOURCE [--port ...]       training/serve/: an OpenAI-compatible HTTP server and a chat page
    orch export SOURCE --hf OUT          training/hf_export.py: the Hugging Face Llama layout (a LoRA run:
                                         training/peft_export.py, the base + a PEFT adapter, or --merge)
    orch data prepare [JOB] [k=v ...]    training/data/prepare.py: tokenize data.sources into MDS shards
    orch plan JOB [k=v ...]              plan.py: the job's step in a fake world of its size (training/plan/)

Nothing here imports torch until a command runs, so `orch --help` stays fast.
"""

from __future__ import annotations

from pathlib import Path

DEFAULT_JOB = Path(__file__).resolve().parents[2] / "jobs" / "pretrain.yaml"


def add_commands(sub) -> None:
    """Add the data plane's subcommands to orch's argparse subparsers."""
    from training.tools import sample

    s = sub.add_parser("generate", help="continue a prompt with a trained model, streaming the text")
    sample.add_sampling_args(s)
    s.add_argument("--prompt", required=True, help="the text to continue (\\n for a newline)")
    s.set_defaults(func=sample.cmd_generate)

    s = sub.add_parser("chat", help="talk to a fine-tuned model in the chat template")
    sample.add_sampling_args(s, source_optional=True)
    s.add_argument(
        "--url",
        default=None,
        help="talk to a running `orch serve` (or any OpenAI-compatible "
        "server) at this address instead of loading SOURCE, e.g. http://127.0.0.1:8000",
    )
    s.add_argument("--api-key", default=None, help="with --url: the server's API key")
    s.set_defaults(func=sample.cmd_chat)

    s = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API, with a chat page")
    s.add_argument("source", help="a run folder (its newest checkpoint), a checkpoint folder or a Hugging Face folder")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    s.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    s.add_argument(
        "--max-batch",
        type=int,
        default=8,
        help="requests decoded together, one forward pass per step for all (default 8)",
    )
    s.add_argument(
        "--max-queue",
        type=int,
        default=64,
        help="requests waiting for a place in the batch; more are refused with 429 (default 64)",
    )
    s.add_argument(
        "--served-model-name", default=None, help="the model name clients ask for (default: the source folder's name)"
    )
    s.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/ requests")
    s.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="weights and activations (default fp32)")
    s.add_argument(
        "--quantize",
        default=None,
        choices=["int8"],
        help="int8: weight-only int8 Linear layers (CPU; docs/serving.md has its measured effect)",
    )
    s.add_argument("--device", default="cpu", help="cpu or cuda")
    s.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own choice)")
    s.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30,
        help="seconds that requests in flight get to finish at shutdown (default 30)",
    )
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("export", help="export a run or checkpoint to the Hugging Face Llama layout")
    s.add_argument("source", help="a run folder or a checkpoint folder")
    s.add_argument("--hf", required=True, metavar="OUT", help="output folder")
    s.add_argument(
        "--merge",
        action="store_true",
        help="a LoRA run: write its base with the adapters merged in, instead of base + PEFT adapter",
    )
    s.set_defaults(func=cmd_export)

    data = sub.add_parser("data", help="data preparation").add_subparsers(dest="data_command", required=True)
    s = data.add_parser("prepare", help="tokenize sources into MDS shards (a job file's data: section)")
    s.add_argument("config", nargs="?", help="job YAML whose data: section to use (default: jobs/pretrain.yaml)")
    s.add_argument("overrides", nargs="*", help="key=value, e.g. data.vocab_size=8192")
    s.set_defaults(func=cmd_data_prepare)

    add_plan_parser(sub)


def add_plan_parser(sub) -> None:
    s = sub.add_parser("plan", help="prove a job fits its GPUs before it queues: memory, collectives, step time")
    s.add_argument("config", help="job YAML")
    s.add_argument("overrides", nargs="*", help="key=value, as for orch submit (before the options)")
    s.add_argument("--world", type=int, help="GPUs in all (default: resources.nodes x resources.nproc_per_node)")
    s.add_argument("--nodes", type=int, help="nodes (with --gpus-per-node)")
    s.add_argument(
        "--gpus-per-node", type=int, help="GPUs per node (default: resources.nproc_per_node; with --world, 8)"
    )
    s.add_argument(
        "--device",
        help="h100 (default), h200, a100-80g, a100-40g: training/plan/devices.py; "
        "resources.gpu_mem_gib replaces its memory",
    )
    s.add_argument("--json", action="store_true", help="print the plan as JSON")
    s.set_defaults(func=cmd_plan)


def cmd_plan(args) -> int:
    from training.tools.plan import cmd_plan as run

    return run(args)


def check_fit(cfg, path: str) -> None:
    """`orch submit --check-fit`: plan.py's check, a SpecError when the job's plan exceeds its GPUs' memory."""
    from training.tools.plan import check_fit as check

    check(cfg, path)


def cmd_export(args) -> int:
    from training.peft_export import export

    out, what = export(args.source, args.hf, merge=args.merge)
    print(f"exported {args.source} -> {out} ({what})")
    return 0


def cmd_serve(args) -> int:
    from training.serve.cli import serve

    return serve(args)


def cmd_data_prepare(args) -> int:
    from jobspec import load_spec
    from training.data.prepare import prepare_data

    overrides = list(args.overrides)
    config = args.config
    if config and "=" in config and not config.endswith((".yaml", ".yml")):
        overrides.insert(0, config)  # `orch data prepare data.vocab_size=8192`: no file given
        config = None
    cfg = load_spec(config or str(DEFAULT_JOB), overrides)
    prepare_data(cfg.data, progress=True)  # a DataError is a ValueError: orch prints it and exits 2
    return 0
