"""StreamingDataset throughput against what the trainer consumes, at the default demo size.

    python -m bench.data_loader                # reads the demo shards (prepares them if missing)

The trainer's consumption is measured in the same process: a few demo training steps.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from bench.common import write_result
from jobspec import load_spec
from training.data.loader import TokenLoader
from training.data.prepare import ensure_data

REPO = Path(__file__).resolve().parents[1]


def loader_tokens_per_s(cfg, batches: int) -> float:
    loader = TokenLoader(cfg.data, "train", cfg.train.micro_batch_size, seed=cfg.seed)
    it = iter(loader)
    next(it)  # opening shards and shared memory is not steady-state throughput
    start = time.perf_counter()
    tokens = 0
    for _ in range(batches):
        x, _ = next(it)
        tokens += x.numel()
    return tokens / (time.perf_counter() - start)


def trainer_tokens_per_s(cfg, steps: int) -> float:
    from training.distributed import init_distributed
    from training.tasks.pretrain import PretrainTask
    from training.trainer import Trainer

    dist_info = init_distributed(cfg.parallel, cfg.train.device)
    run_dir = Path(tempfile.mkdtemp())
    trainer = Trainer(cfg, dist_info, run_dir, PretrainTask(cfg, dist_info, run_dir))
    trainer.train_step()
    start = time.perf_counter()
    tokens = sum(trainer.train_step()[2] for _ in range(steps))
    return tokens / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, default=2000)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cfg = load_spec(str(REPO / "jobs" / "pretrain.yaml"), args.overrides)
    ensure_data(cfg.data, progress=True)
    loader_tps = loader_tokens_per_s(cfg, args.batches)
    train_tps = trainer_tokens_per_s(cfg, args.steps)
    ratio = loader_tps / train_tps
    figures = {
        "loader_tokens_per_s": round(loader_tps),
        "trainer_tokens_per_s": round(train_tps),
        "ratio": round(ratio, 1),
    }
    print(
        f"loader {loader_tps:,.0f} tok/s   trainer consumes {train_tps:,.0f} tok/s   ratio {ratio:.1f}x (target >= 20x)"
    )
    print(
        "wrote",
        write_result(
            "data_loader",
            {
                "batches": args.batches,
                "overrides": args.overrides,
                "micro_batch_size": cfg.train.micro_batch_size,
                "seq_len": cfg.data.seq_len,
            },
            figures,
        ),
    )


if __name__ == "__main__":
    main()
