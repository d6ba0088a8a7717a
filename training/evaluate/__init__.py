"""Evaluation and sampling: what a trained model can do.

    load.py      load_model(run_or_checkpoint_or_hf) -> (GPT in eval mode, tokenizer)
    tasks.py     task YAML files in lm-evaluation-harness's layout (jobs/tasks/)
    scoring.py   perplexity and bits per byte, multiple choice by log-likelihood, generation with checkers
    job.py       the eval job (kind: eval): eval.json, and report.py's report.md with PNG plots
    sample.py    `orch generate` and `orch chat`
    make_tasks.py  builds jobs/tasks/data/stdlib_*.jsonl from the held-out standard library modules
"""


def __getattr__(name):
    # Lazy: `orch --help` imports this package, and torch takes seconds to import.
    if name in ("EvalError", "load_model"):
        from training.evaluate import load

        return getattr(load, name)
    raise AttributeError(name)


__all__ = ["EvalError", "load_model"]
