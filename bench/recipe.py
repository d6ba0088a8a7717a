"""The recipe ablation: held-out bits per byte at a fixed token budget, the recipe of 43dca9c against each change.

    python -m bench.recipe                          # every row at 4.9M tokens; writes docs/recipe.md's table
    python -m bench.recipe --tokens 1e6             # a cheaper screen (bench/results/recipe_screen-*.json)
    python -m bench.recipe --only baseline,muon     # a subset of the rows
    python -m bench.recipe --row muon_lr04=optim.name=muon,optim.muon_lr=0.04   # an extra row
    python -m bench.recipe --list

Each row is one `python -m training.main jobs/pretrain.yaml` run of its own, over the same number of
training tokens (so machine speed does not enter the comparison), validated once at the end on the
whole held-out split (the stdlib's json/ and email/ packages). "baseline" pins the earlier recipe
(commit 43dca9c) key by key, so later changes to jobs/pretrain.yaml don't move it; "chosen" is
jobs/pretrain.yaml as it stands. Runs live in runs/recipe/<tokens>/<row>-s<seed>/: a finished row is
reused while its resolved config is unchanged (keys that only change speed or bookkeeping aside), an
interrupted one resumes from its last checkpoint.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.common import RESULTS, device_slug, write_between_markers, write_result
from jobspec import load_spec

REPO = Path(__file__).resolve().parents[1]
JOB = REPO / "jobs" / "pretrain.yaml"
DOC = REPO / "docs" / "recipe.md"
FULL_BUDGET = 4_915_200  # the demo's 1,200 steps of 16 x 256 tokens
# (section, key) that don't change what a row learns: a cached row stays valid when only these change
NOT_LEARNED = [
    ("train", "compile"),
    ("train", "log_every"),
    ("train", "time_budget_min"),
    ("", "checkpoint"),
    ("", "resources"),
    ("", "executor"),
    ("", "name"),
    ("", "runs_dir"),
    ("data", "num_workers"),
    ("train", "max_nonfinite_steps"),
    ("parallel", "collective_timeout_s"),
]  # safety nets, not recipe

# The recipe of 43dca9c, every key that decides what is learned pinned (changes to the job file
# then move only the "chosen" row).
BASELINE = [
    "optim.name=adamw",
    "optim.lr=3e-3",
    "optim.schedule=cosine",
    "optim.decay_fraction=0.2",
    "optim.min_lr_ratio=0.1",
    "optim.warmup_steps=50",
    "optim.weight_decay=0.1",
    "optim.beta1=0.9",
    "optim.beta2=0.95",
    "optim.eps=1e-8",
    "optim.grad_clip=1.0",
    "optim.muon_lr=0.01",
    "optim.muon_momentum=0.95",
    "optim.muon_weight_decay=0.0",
    "model.mlp=swiglu",
    "model.qk_norm=false",
    "model.logit_softcap=null",
    "model.tie_embeddings=true",
    "model.n_layer=4",
    "model.d_model=256",
    "model.n_head=4",
    "model.n_kv_head=2",
    "model.ffn_hidden=null",
    "model.max_seq_len=256",
    "model.vocab_size=null",
    "model.rope_theta=10000.0",
    "model.norm_eps=1e-5",
    "model.init_std=0.02",
    "data.sources=[demo]",
    "data.seq_len=256",
    "data.vocab_size=4096",
    "train.micro_batch_size=16",
    "train.grad_accum_steps=1",
    "train.dtype=bf16",
]

# name -> (what it changes, overrides on top of BASELINE); "chosen" is the job file alone.
ROWS: dict[str, tuple[str, list[str]]] = {
    "baseline": ("the recipe before (43dca9c): AdamW 3e-3, cosine, SwiGLU, tied, 16 x 256 tokens, vocab 4096", []),
    "muon": ("optim.name=muon, optim.muon_lr=0.01", ["optim.name=muon", "optim.muon_lr=0.01"]),
    "qk_norm": ("model.qk_norm=true", ["model.qk_norm=true"]),
    "relu2": ("model.mlp=relu2 (same parameters)", ["model.mlp=relu2"]),
    "softcap": ("model.logit_softcap=15", ["model.logit_softcap=15"]),
    "untied": ("model.tie_embeddings=false", ["model.tie_embeddings=false"]),
    "wsd": ("optim.schedule=wsd (decay_fraction 0.2)", ["optim.schedule=wsd"]),
    "seq512": (
        "data.seq_len=512, 8 sequences a step",
        ["data.seq_len=512", "model.max_seq_len=512", "train.micro_batch_size=8"],
    ),
    "batch8": ("train.micro_batch_size=8 (twice the steps)", ["train.micro_batch_size=8"]),
    "batch32": ("train.micro_batch_size=32 (half the steps)", ["train.micro_batch_size=32"]),
    "vocab8192": ("data.vocab_size=8192", ["data.vocab_size=8192"]),
    "muon_vocab8192": (
        "muon and vocab8192 together (cosine)",
        ["optim.name=muon", "optim.muon_lr=0.01", "data.vocab_size=8192"],
    ),
    "muon_wsd": ("muon and wsd together (vocab 4096)", ["optim.name=muon", "optim.muon_lr=0.01", "optim.schedule=wsd"]),
    "muon_wsd_vocab8192": (
        "muon_wsd with vocab 8192",
        ["optim.name=muon", "optim.muon_lr=0.01", "optim.schedule=wsd", "data.vocab_size=8192"],
    ),
    "chosen": ("jobs/pretrain.yaml as it stands (the new defaults)", []),
}


def row_overrides(name: str, extra: list[str], tokens: int, seed: int) -> list[str]:
    """The row's job overrides, plus what every row shares: the token budget, one validation at the
    end over the whole held-out split, no time budget, checkpoints to resume an interrupted row."""
    changes = extra if name == "chosen" else [*BASELINE, *extra]
    overrides = _resolved(changes)
    steps = tokens // (
        int(overrides["train.micro_batch_size"])
        * int(overrides["data.seq_len"])
        * int(overrides["train.grad_accum_steps"])
    )
    data_dir = f"data/recipe/v{overrides['data.vocab_size']}-s{overrides['data.seq_len']}"
    return [
        *changes,
        f"train.max_steps={steps}",
        "train.time_budget_min=null",
        "train.val_every=0",
        "train.val_batches=0",
        "train.log_every=20",
        f"checkpoint.every={max(50, steps // 6)}",
        "checkpoint.keep_last=1",
        f"seed={seed}",
        f"data.dir={data_dir}",
    ]


def _resolved(changes: list[str]) -> dict[str, str]:
    """The job file's values of the keys the step count and data folder depend on, after `changes`."""
    from omegaconf import OmegaConf

    cfg = load_spec(str(JOB), changes)
    keys = ("train.micro_batch_size", "data.seq_len", "train.grad_accum_steps", "data.vocab_size")
    return {k: str(OmegaConf.select(cfg, k)) for k in keys}


def what_is_learned(overrides: list[str]) -> dict:
    """The row's resolved config without the keys that change only speed or bookkeeping."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(load_spec(str(JOB), overrides))
    for section, key in NOT_LEARNED:
        (cfg[section] if section else cfg).pop(key, None)
    return cfg


def run_row(name: str, overrides: list[str], run_dir: Path) -> dict:
    """Train the row (or reuse / resume its run folder) and read its figures."""
    stamp, learned = run_dir / "bench_row.json", what_is_learned(overrides)
    if run_dir.exists() and (not stamp.is_file() or json.loads(stamp.read_text()).get("config") != learned):
        shutil.rmtree(run_dir)  # made by another definition of this row: start over
    run_dir.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps({"row": name, "overrides": overrides, "config": learned}))
    summary = run_dir / "summary.json"
    if not summary.is_file():
        print(f"[recipe] {name}: training ({' '.join(overrides)})", flush=True)
        start = time.time()
        with open(run_dir / "train.log", "a") as log:
            code = subprocess.call(
                [sys.executable, "-m", "training.main", str(JOB), *overrides, "--run-dir", str(run_dir)],
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        if code != 0:
            raise SystemExit(f"[recipe] {name} failed (exit {code}): see {run_dir / 'train.log'}")
        print(f"[recipe] {name}: done in {(time.time() - start) / 60:.1f} min", flush=True)
    result = json.loads(summary.read_text())
    speeds = [
        r["tokens_per_s"]
        for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
        if "tokens_per_s" in r
    ][1:]  # the first window holds start-up
    return {
        "val_bpb": round(result["val_bpb"], 4),
        "val_loss": round(result["val_loss"], 4),
        "xz_bpb": result.get("xz_bpb"),
        "tokens": result["tokens_seen"],
        "steps": result["step"],
        "tokens_per_s": round(statistics.median(speeds)) if speeds else None,
        "overrides": overrides,
    }


def table(rows: dict, descriptions: dict) -> str:
    base = rows.get("baseline", {}).get("val_bpb")
    # tokens/s stay in the JSON only: rows run at other times, on a shared machine, compiled or not, so
    # their speeds are not comparable (speed is measured side by side: docs/recipe.md).
    lines = ["| row | change | bits/byte | vs baseline |", "|---|---|---|---|"]
    for name, r in rows.items():
        delta = f"{r['val_bpb'] - base:+.3f}" if base is not None else ""
        lines.append(f"| {name} | {descriptions.get(name, '')} | {r['val_bpb']:.3f} | {delta} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=float, default=FULL_BUDGET, help="training tokens per row")
    ap.add_argument("--only", help="comma-separated rows to run (default: all)")
    ap.add_argument(
        "--row",
        action="append",
        default=[],
        metavar="NAME=K=V,K=V",
        help="an extra row: overrides on top of the baseline",
    )
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--list", action="store_true", help="print the rows and exit")
    args = ap.parse_args()
    rows = {name: (what, list(changes)) for name, (what, changes) in ROWS.items()}
    for spec in args.row:
        name, _, changes = spec.partition("=")
        rows[name] = (changes.replace(",", ", "), changes.split(","))
    if args.list:
        for name, (what, changes) in rows.items():
            print(f"{name:12s} {what}")
        return
    names = args.only.split(",") if args.only else list(rows)
    unknown = [n for n in names if n not in rows]
    if unknown:
        raise SystemExit(f"--only: unknown row {unknown[0]!r}; rows: {', '.join(rows)}")
    tokens = int(args.tokens)
    results = {}
    for name in names:
        overrides = row_overrides(name, rows[name][1], tokens, args.seed)
        results[name] = run_row(name, overrides, REPO / "runs" / "recipe" / str(tokens) / f"{name}-s{args.seed}")
        print(f"[recipe] {name}: {results[name]['val_bpb']:.4f} bits/byte", flush=True)
    print("\n" + table(results, {n: rows[n][0] for n in names}))
    full = tokens == FULL_BUDGET  # the table of record: its JSON and docs/recipe.md
    bench = "recipe" if full else f"recipe_screen_{tokens}"
    earlier = RESULTS / f"{bench}-{device_slug()}-{datetime.date.today().isoformat()}.json"
    if earlier.is_file():  # rows of the same budget run on the same day (in parts) add up to one table
        results = {**json.loads(earlier.read_text())["figures"], **results}
    print("wrote", write_result(bench, {"tokens": tokens, "seed": args.seed, "baseline": BASELINE}, results))
    if full:
        ranked = dict(sorted(results.items(), key=lambda kv: kv[1]["val_bpb"]))
        write_between_markers(DOC, "table", table(ranked, {n: rows[n][0] for n in ranked if n in rows}))


if __name__ == "__main__":
    main()
