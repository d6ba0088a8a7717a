"""Full fine-tuning beside LoRA on the demo SFT (jobs/sft.yaml), in one invocation: trainable parameters,
step time, peak memory (RSS of the training process on CPU, peak allocated on GPU) and held-out
completion loss (the SFT job's val_loss at its end).

    python -m training.main jobs/pretrain.yaml train.max_steps=300 train.time_budget_min=null   # first
    python -m bench.lora --pretrain runs/pretrain                  # both arms, results in bench/results/
    python -m bench.lora --pretrain runs/pretrain --lora lora.rank=32 optim.lr=3e-3   # other LoRA settings
    python -m bench.lora --arm r8 lora.rank=8 --arm qv "lora.target_modules=[wq,wv]"  # more LoRA arms

Each arm runs as its own process (so its peak RSS is its own), one after the other; step time is the
median over the logged windows of seconds per optimizer step (validation and checkpoints excluded).
Every LoRA arm (`lora`: the job's defaults plus --lora; each --arm NAME: the defaults plus its overrides)
is compared with the full arm: val_loss ratio, and the share of full fine-tuning's held-out gain it gets.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SFT_JOB = REPO / "jobs" / "sft.yaml"


def one_arm(args) -> None:
    """In the child: train, then print what was measured as one JSON line."""
    import torch

    from training.main import run

    code = run([str(SFT_JOB), *args.overrides, "--run-dir", args.run_dir])
    run_dir = Path(args.run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    config = (run_dir / "config.yaml").read_text()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r and r.get("tokens_per_s")]
    import yaml

    cfg = yaml.safe_load(config)
    tokens_per_step = cfg["train"]["micro_batch_size"] * cfg["data"]["seq_len"] * cfg["train"]["grad_accum_steps"]
    step_s = statistics.median(tokens_per_step / r["tokens_per_s"] for r in train[1:] or train)
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if torch.cuda.is_available()
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    log = (run_dir / "bench.log").read_text() if (run_dir / "bench.log").exists() else ""
    evals = [r["val_loss"] for r in records if "val_loss" in r and r.get("step") == 0]
    print(
        "RESULT "
        + json.dumps(
            {
                "exit": code,
                "val_loss": summary["val_loss"],
                "val_loss_start": evals[0] if evals else None,
                "step_s": step_s,
                "peak_mb": peak,
                "steps": summary["step"],
                "log": log[-200:],
            }
        ),
        flush=True,
    )


def trainable_share(overrides: list[str]) -> dict:
    """Trainable parameters of the demo model under these overrides, counted on the meta device."""
    import torch
    from omegaconf import OmegaConf

    from model.gpt import GPT
    from model.lora import apply_lora, trainable_share as share
    from jobspec import load_spec
    from training.run_folder import starting_point

    cfg = load_spec(str(SFT_JOB), overrides)
    model_cfg, _ = starting_point(cfg.checkpoint.init_from)
    with torch.device("meta"):
        model = GPT(model_cfg)
    if cfg.lora.enabled:
        apply_lora(
            model,
            cfg.lora.rank,
            cfg.lora.alpha,
            list(cfg.lora.target_modules),
            cfg.lora.dropout,
            list(cfg.lora.modules_to_save),
        )
    trainable, total = share(model)
    return {
        "trainable": trainable,
        "total": total,
        "trainable_pct": 100 * trainable / total,
        "lora": OmegaConf.to_container(cfg.lora) if cfg.lora.enabled else None,
    }


def run_arm(name: str, overrides: list[str], workdir: Path) -> dict:
    run_dir = workdir / f"sft-{name}"
    cmd = [sys.executable, "-m", "bench.lora", "--one", "--run-dir", str(run_dir), *overrides]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=os.getcwd())
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    if result.returncode != 0 or not lines:
        raise SystemExit(f"the {name} arm failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    figures = json.loads(lines[-1][len("RESULT ") :])
    figures.pop("log", None)
    figures.update(trainable_share(overrides))
    print(f"{name}: {json.dumps(figures)}", flush=True)
    return figures


def compare(arm: dict, full: dict) -> dict:
    """A LoRA arm against the full arm: ratios, and the share of full fine-tuning's held-out gain."""
    out = {
        "val_loss_over_full": arm["val_loss"] / full["val_loss"],
        "step_time_over_full": arm["step_s"] / full["step_s"],
        "peak_memory_over_full": arm["peak_mb"] / full["peak_mb"],
        "within_5pct": arm["val_loss"] <= 1.05 * full["val_loss"],
    }
    start = full.get("val_loss_start")
    if start is not None and start > full["val_loss"]:
        out["gain_over_full_gain"] = (start - arm["val_loss"]) / (start - full["val_loss"])
    return out


def main() -> None:
    p = argparse.ArgumentParser(
        prog="python -m bench.lora", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--pretrain", default="runs/pretrain", help="the pretraining run SFT starts from")
    p.add_argument("--workdir", default="runs/bench-lora", help="where the SFT runs go (replaced)")
    p.add_argument("--lora", nargs="*", default=[], help="overrides for the `lora` arm (the job's LoRA defaults)")
    p.add_argument(
        "--arm",
        nargs="+",
        action="append",
        default=[],
        metavar=("NAME", "OVERRIDE"),
        help="one more LoRA arm: its name, then its overrides (repeatable)",
    )
    p.add_argument("--common", nargs="*", default=[], help="overrides for every arm, e.g. train.max_steps=50")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--run-dir", help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        return one_arm(args)
    import shutil

    from bench.common import write_result

    workdir = Path(args.workdir)
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    common = [f"checkpoint.init_from={args.pretrain}", "train.time_budget_min=null", "checkpoint.every=0", *args.common]
    arms = {"lora": args.lora, **{name: overrides for name, *overrides in args.arm}}
    full = run_arm("full", common, workdir)
    results = {"full": full}
    for name, overrides in arms.items():
        results[name] = run_arm(name, [*common, "lora.enabled=true", *overrides], workdir)
        results[name].update(compare(results[name], full))
    shown = ("val_loss", "val_loss_over_full", "gain_over_full_gain", "trainable_pct")
    print(json.dumps({k: {m: v for m, v in r.items() if m in shown} for k, r in results.items()}, indent=1))
    path = write_result(
        "lora", {"job": "jobs/sft.yaml", "pretrain": args.pretrain, "common": common, "arms": arms}, results
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
