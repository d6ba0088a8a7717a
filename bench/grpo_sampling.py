"""GRPO's sampling, before and after batched group sampling, in one invocation; then, optionally, what GRPO
buys per minute on the demo (val_parses gained per minute of training).

    python -m bench.grpo_sampling --model runs/sft                      # sampling arms only
    python -m bench.grpo_sampling --model runs/sft --grpo-steps 60      # and a jobs/grpo.yaml run from it

Sampling arms, on the same prompts (jobs/grpo.yaml's shape: micro_batch_size prompts x group_size completions
of <= max_new_tokens, its temperature and top_k, bf16 autocast as its train.dtype says):

    per_completion  one generate() call per completion: each prompt read group_size times, batch of 1
    old_path        GRPO before the rework: one call of model/generate.py as it was then (read from git at
                    OLD_GENERATE_REV), each prompt repeated group_size times as rows, and every row computed
                    until the last one stops (skipped when git or that commit is missing)
    repeated_rows   today's generate() with the prompts repeated as rows: rows that stopped leave the batch
    grouped         one call with samples=group_size (GRPO now): each prompt read once, its keys and values
                    copied to its samples, and stopped rows leave the batch

The arms alternate round by round (A B C D A B C D ...), so load that drifts on a shared machine touches each
alike; figures are medians over rounds. Sampled tokens per second of wall time, and per second of this
process's CPU time (less sensitive to other processes on the machine), with ratios against per_completion and
old_path. On a machine shared by many processes run it with OMP_NUM_THREADS=1: two threads that wait for each
other make batch-1 decoding many times slower there.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
import types
from contextlib import nullcontext
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
GRPO_JOB = REPO / "jobs" / "grpo.yaml"


OLD_GENERATE_REV = "e7b3645"  # the last commit whose model/generate.py sampled a group as repeated rows


def old_generate():
    """generate() of model/generate.py at OLD_GENERATE_REV, from this repository's git history; None without it."""
    try:
        source = subprocess.run(["git", "-C", str(REPO), "show", f"{OLD_GENERATE_REV}:model/generate.py"],
                                capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    module = types.ModuleType("old_generate")
    exec(compile(source, f"{OLD_GENERATE_REV}:model/generate.py", "exec"), module.__dict__)
    return module.generate


def sample(model, prompts: list[list[int]], arm: str, g, generator, stop_id: int, old=None) -> list[list[int]]:
    kwargs = dict(temperature=g.temperature, top_k=g.top_k, stop_tokens=[stop_id], generator=generator)
    from model.generate import generate

    repeated = [p for p in prompts for _ in range(g.group_size)]
    if arm == "per_completion":
        return [generate(model, [p], g.max_new_tokens, **kwargs)[0] for p in repeated]
    if arm == "old_path":
        return old(model, repeated, g.max_new_tokens, **kwargs)
    if arm == "repeated_rows":
        return generate(model, repeated, g.max_new_tokens, **kwargs)
    return generate(model, prompts, g.max_new_tokens, samples=g.group_size, **kwargs)


def sampling_arms(model, tokenizer, cfg, rounds: int) -> dict:
    """Each arm `rounds` times on the same prompts (a new batch of prompts per round)."""
    from training.posttrain.chat import encode_prompt, end_of_turn_id
    from training.posttrain.jsonl import read_jsonl

    g, n = cfg.grpo, cfg.train.micro_batch_size
    records = read_jsonl(Path(g.demo_dir) / "grpo_train.jsonl", ("prompt",), what="grpo demo prompts")
    stop_id = end_of_turn_id(tokenizer)
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if cfg.train.dtype == "bf16" else nullcontext
    old = old_generate()
    arms = ("per_completion", *(("old_path",) if old else ()), "repeated_rows", "grouped")
    runs: dict[str, list[dict]] = {a: [] for a in arms}
    with torch.no_grad(), autocast():
        sample(model, [encode_prompt(tokenizer, records[0]["prompt"])], "grouped", g, None, stop_id)  # warm-up
        for r in range(rounds):
            prompts = [encode_prompt(tokenizer, rec["prompt"]) for rec in records[r * n:(r + 1) * n]]
            for arm in arms:
                wall, cpu = time.perf_counter(), time.process_time()
                completions = sample(model, prompts, arm, g, torch.Generator().manual_seed(r), stop_id, old)
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                tokens = sum(map(len, completions))
                runs[arm].append({"tokens": tokens, "wall_s": wall, "cpu_s": cpu})
                print(f"round {r} {arm}: {tokens} tokens, {tokens / wall:.0f}/s wall, {tokens / cpu:.0f}/s CPU",
                      flush=True)
    figures = {}
    for arm in arms:
        figures[arm] = {"tokens_per_s": statistics.median(x["tokens"] / x["wall_s"] for x in runs[arm]),
                        "tokens_per_cpu_s": statistics.median(x["tokens"] / x["cpu_s"] for x in runs[arm]),
                        "mean_completion_tokens": sum(x["tokens"] for x in runs[arm]) / (rounds * n * g.group_size),
                        "rounds": runs[arm]}
    for arm in arms[1:]:
        for base in ("per_completion", "old_path"):
            if base in figures and base != arm:
                for unit in ("tokens_per_s", "tokens_per_cpu_s"):
                    figures[arm][f"{unit}_over_{base}"] = figures[arm][unit] / figures[base][unit]
    return figures


def grpo_run(model_dir: str, steps: int, run_dir: Path, overrides: list[str]) -> dict:
    """jobs/grpo.yaml from model_dir for `steps` steps (val_parses measured at step 0 and at the end)."""
    import shutil

    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "training.main", str(GRPO_JOB), f"checkpoint.init_from={model_dir}",
           f"train.max_steps={steps}", *overrides, "--run-dir", str(run_dir)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = subprocess.run(cmd, capture_output=True, text=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        raise SystemExit(f"the GRPO run failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "val_parses" in r]
    train = [r for r in records if "loss" in r]
    start, end = evals[0], evals[-1]
    # Training minutes: from the end of the step-0 evaluation to the last step (sampling, scoring, updates
    # and checkpoints; the two evaluations excluded).
    minutes = (train[-1]["time"] - start["time"]) / 60
    cpu_minutes = (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) / 60
    keys = ("val_parses", "val_signature", "val_reward", "val_distinct_frac", "val_len_ratio", "val_completion_len")
    return {"steps": steps, "start": {k: start.get(k) for k in keys}, "end": {k: end.get(k) for k in keys},
            "train_minutes": minutes, "process_cpu_minutes": cpu_minutes,
            "val_parses_gained_per_minute": (end["val_parses"] - start["val_parses"]) / minutes,
            "warnings": [line for line in (result.stdout + result.stderr).splitlines() if "warning" in line][-5:],
            "last_train": {k: train[-1].get(k) for k in ("reward_mean", "kl", "clip_frac", "distinct_frac",
                                                         "len_ratio", "completion_len")}}


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.grpo_sampling", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="runs/sft", help="the run (or checkpoint) GRPO starts from: a demo SFT/DPO run")
    p.add_argument("--rounds", type=int, default=3, help="sampling rounds per arm (new prompts each round)")
    p.add_argument("--grpo-steps", type=int, default=0, help="also run jobs/grpo.yaml this many steps (0: don't)")
    p.add_argument("--run-dir", default="runs/bench-grpo", help="where the GRPO run goes (replaced)")
    p.add_argument("overrides", nargs="*", help="jobs/grpo.yaml overrides, for both parts")
    args = p.parse_args()

    from bench.common import write_result
    from jobspec import load_spec
    from training.run_folder import load_model

    cfg = load_spec(str(GRPO_JOB), [f"checkpoint.init_from={args.model}", *args.overrides])
    model, tokenizer = load_model(args.model)
    if not (Path(cfg.grpo.demo_dir) / "grpo_train.jsonl").is_file():
        from training.posttrain.demo_data import write_demo_data
        from training.run_folder import starting_point

        write_demo_data(cfg.grpo.demo_dir, starting_point(args.model).tokenizer, max_tokens=cfg.data.seq_len)
    figures = {"sampling": sampling_arms(model, tokenizer, cfg, args.rounds)}
    del model
    if args.grpo_steps:
        figures["grpo"] = grpo_run(args.model, args.grpo_steps, Path(args.run_dir), args.overrides)
    g = cfg.grpo
    config = {"model": args.model, "prompts_per_round": cfg.train.micro_batch_size, "group_size": g.group_size,
              "max_new_tokens": g.max_new_tokens, "temperature": g.temperature, "top_k": g.top_k,
              "dtype": cfg.train.dtype, "rounds": args.rounds, "threads": torch.get_num_threads(),
              "old_generate": OLD_GENERATE_REV,
              "grpo_overrides": args.overrides}
    summary = {a: {k: round(v, 2) for k, v in f.items() if isinstance(v, float)}
               for a, f in figures["sampling"].items()}
    print(json.dumps(summary, indent=1))
    if "grpo" in figures:
        print(json.dumps({k: v for k, v in figures["grpo"].items() if k != "warnings"}, indent=1))
    print(f"wrote {write_result('grpo_sampling', config, figures)}")


if __name__ == "__main__":
    main()
