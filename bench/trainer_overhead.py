"""Tokens/s of the full trainer against a bare loop over the same model and batches, in one process.

    python -m bench.trainer_overhead                # the demo model on demo shards
    python -m bench.trainer_overhead --steps 40

The full trainer: Trainer.train_step with the MDS streaming loader, LR schedule, clipping,
metrics.jsonl and the progress line. The bare loop: forward, backward, clipping, the same optimizer over
batches already in memory: new ones each round, read from the same loader before its clock starts, so both
train on data they have not seen. A third loop, the baseline before 2026-12-02, trains on the same 30 batches
every round; its figure against the bare loop says how much that reuse flattered the baseline.

The loops take turns round by round (each goes first in turn), so background load hits them alike. `ratio`
is the median over rounds of bare/trainer seconds within one round (robust to one lucky or unlucky round);
`best_round_ratio` compares each loop's best round.
"""

from __future__ import annotations

import argparse
import statistics
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
        trainer.metrics.log(
            {
                "step": trainer.step,
                "loss": loss,
                "lr": 0.0,
                "grad_norm": grad_norm,
                "tokens_per_s": 0.0,
                "tokens_seen": trainer.tokens_seen,
                "mfu": None,
                "eta_s": None,
            }
        )
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
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("overrides", nargs="*", help="job overrides, e.g. data.dir=/tmp/demo")
    args = ap.parse_args()
    cfg = load_spec(str(REPO / "jobs" / "pretrain.yaml"), ["train.log_every=1", *args.overrides])
    run_dir = Path(tempfile.mkdtemp(prefix="orch-bench-"))
    dist_info = init_distributed(cfg.parallel, cfg.train.device)
    task = PretrainTask(cfg, dist_info, run_dir)
    trainer = Trainer(cfg, dist_info, run_dir, task)
    reused = [task.next_batch() for _ in range(args.steps)]
    tokens = args.steps * reused[0][1].numel()
    trainer_round(trainer, 3)  # warm-up: allocator, first shard reads
    bare_round(trainer.model, trainer.optimizer, reused[:3], trainer.autocast)

    def bare_on_new_batches() -> float:
        batches = [task.next_batch() for _ in range(args.steps)]  # before the clock starts
        return bare_round(trainer.model, trainer.optimizer, batches, trainer.autocast)

    loops = {
        "trainer": lambda: trainer_round(trainer, args.steps),
        "bare": bare_on_new_batches,
        "bare_reused": lambda: bare_round(trainer.model, trainer.optimizer, reused, trainer.autocast),
    }
    seconds = {name: [] for name in loops}
    names = list(loops)
    for r in range(args.rounds):  # the order rotates: no loop always runs right after another
        turn = r % len(names)
        for name in names[turn:] + names[:turn]:
            seconds[name].append(loops[name]())

    def paired(a: str, b: str) -> float:  # median over rounds of a's speed over b's
        return round(statistics.median(tb / ta for ta, tb in zip(seconds[a], seconds[b])), 3)

    full_tps, bare_tps = tokens / min(seconds["trainer"]), tokens / min(seconds["bare"])
    figures = {
        "trainer_tokens_per_s": round(full_tps),
        "bare_tokens_per_s": round(bare_tps),
        "ratio": paired("trainer", "bare"),
        "best_round_ratio": round(full_tps / bare_tps, 3),
        "reused_batches_ratio": paired("bare_reused", "bare"),
    }
    print(
        f"trainer {full_tps:,.0f} tok/s   bare loop {bare_tps:,.0f} tok/s (best rounds)   ratio "
        f"{figures['ratio']:.3f} (median of rounds; target >= 0.97), best rounds {figures['best_round_ratio']:.3f}"
        f"   bare loop on reused batches: {figures['reused_batches_ratio']:.3f}x the bare loop"
    )
    print(
        "wrote",
        write_result(
            "trainer_overhead", {"steps": args.steps, "rounds": args.rounds, "overrides": args.overrides}, figures
        ),
    )


if __name__ == "__main__":
    main()
