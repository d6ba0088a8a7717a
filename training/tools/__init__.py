"""The data plane's commands that `orch` runs in the user's own process: the second entry point into
training/, beside training/main.py (the trainer). orchestrator/cli.py imports this module alone, lazily.

    orch generate SOURCE --prompt ...    sample.py: stream a continuation
    orch chat SOURCE                     sample.py: talk to a fine-tuned model in its chat format
    orch export SOURCE --hf OUT          training/hf_export.py: the Hugging Face Llama layout (a LoRA run:
                                         training/peft_export.py, the base + a PEFT adapter, or --merge)
    orch data prepare [JOB] [k=v ...]    training/data/prepare.py: tokenize data.sources into MDS shards

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
    sample.add_sampling_args(s)
    s.set_defaults(func=sample.cmd_chat)

    s = sub.add_parser("export", help="export a run or checkpoint to the Hugging Face Llama layout")
    s.add_argument("source", help="a run folder or a checkpoint folder")
    s.add_argument("--hf", required=True, metavar="OUT", help="output folder")
    s.add_argument("--merge", action="store_true",
                   help="a LoRA run: write its base with the adapters merged in, instead of base + PEFT adapter")
    s.set_defaults(func=cmd_export)

    data = sub.add_parser("data", help="data preparation").add_subparsers(dest="data_command", required=True)
    s = data.add_parser("prepare", help="tokenize sources into MDS shards (a job file's data: section)")
    s.add_argument("config", nargs="?", help="job YAML whose data: section to use (default: jobs/pretrain.yaml)")
    s.add_argument("overrides", nargs="*", help="key=value, e.g. data.vocab_size=8192")
    s.set_defaults(func=cmd_data_prepare)


def cmd_export(args) -> int:
    from training.peft_export import export

    out, what = export(args.source, args.hf, merge=args.merge)
    print(f"exported {args.source} -> {out} ({what})")
    return 0


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
