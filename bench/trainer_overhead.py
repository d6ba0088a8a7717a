"""Tokens/s of the full trainer against a bare loop over the same model and batches, in one process.

    python -m bench.trainer_overhead                # the demo model on demo shards
    python -m bench.trainer_overhead --steps 40

The full trainer: Trainer.train_step with the MDS streaming loader, LR schedule, clipping,
metrics.jsonl and the progress line. The bare loop: forward, backward, AdamW step over batches
already in memory. The two alternate round by round, each going first every other round, so background
load hits both alike; each one's figure is its best round.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from bench.common import write_result
from jobspec import load_spec
from training.distributed import init_distributed
from training.tasks.pretrain import PretrainTask
from training.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]


def trainer_round(trainer: Trainer, steps: int) -> float:
    """Seconds for `steps` optimizer steps through the trainer, logging as fit() does."""
    start = time.perf_counter()
    for _ in range(steps):
        loss, grad_norm, tokens = trainer.train_step()
        trainer.step += 1
        trainer.metrics.log({"step": trainer.step, "loss": loss, "lr": 0.0, "grad_norm": grad_norm,
                             "tokens_per_s": 0.0, "tokens_seen": trainer.tokens_seen, "mfu": None, "eta_s": None})
    return time.perf_counter() - start


def bare_round(model, optimizer, batches, autocast) -> float:
    start = time.perf_counter()
    for x, y in batches:
        with autocast:  # the loss the trainer computes (chunked, compiled with the blocks under train.compile)
            loss = model(x, targets=y) / y.numel()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # the trainer reads the loss every step too
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("overrides", nargs="*", help="job overrides, e.g. data.dir=/tmp/demo")
    args = ap.parse_args()
    cfg = load_spec(str(REPO / "jobs" / "pretrain.yaml"), ["train.log_every=1", *args.overrides])
    run_dir = Path(tempfile.mkdtemp(prefix="orch-bench-"))
    dist_info = init_distributed(cfg.parallel, cfg.train.device)
    task = PretrainTask(cfg, dist_info, run_dir)
    trainer = Trainer(cfg, dist_info, run_dir, task)
    batches = [task.next_batch() for _ in range(args.steps)]
    tokens = args.steps * batches[0][1].numel()
    trainer_round(trainer, 3)  # warm-up: allocator, first shard reads
    bare_round(trainer.model, trainer.optimizer, batches[:3], trainer.autocast)
    full, bare = [], []
    for r in range(args.rounds):  # which goes first alternates: neither always runs right after the other
        rounds = [lambda: full.append(trainer_round(trainer, args.steps)),
                  lambda: bare.append(bare_round(trainer.model, trainer.optimizer, batches, trainer.autocast))]
        for run in (rounds if r % 2 == 0 else rounds[::-1]):
            run()
    full_tps, bare_tps = tokens / min(full), tokens / min(bare)
    figures = {"trainer_tokens_per_s": round(full_tps), "bare_tokens_per_s": round(bare_tps),
               "ratio": round(full_tps / bare_tps, 3)}
    print(f"trainer {full_tps:,.0f} tok/s   bare loop {bare_tps:,.0f} tok/s   ratio {figures['ratio']:.3f} (target >= 0.97)")
    print("wrote", write_result("trainer_overhead", {"steps": args.steps, "rounds": args.rounds,
                                                      "overrides": args.overrides}, figures))


if __name__ == "__main__":
    main()
