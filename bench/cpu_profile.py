"""Where one CPU training step of the demo goes: matmuls, attention, the loss, elementwise kernels,
the optimizer, data, Python, and the kernel's (system) share, from torch.profiler and getrusage.

    python -m bench.cpu_profile                          # the demo job as it stands
    python -m bench.cpu_profile optim.name=adamw train.compile=false

Shares are of the profiled steps' wall time on the main thread: an op's self time counts once however
many threads it used. "python and framework" is what no op accounts for (the interpreter, autograd's
bookkeeping, the dispatcher). User and system CPU seconds (all threads) come from getrusage over the
same steps without the profiler, with the page faults (each a trip into the kernel).
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

from training.cpu_setup import set_openmp_wait_policy

set_openmp_wait_policy()  # as training.main does, before torch loads

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402

from bench.common import write_result  # noqa: E402
from orchestrator.spec import load_spec  # noqa: E402
from training.distributed import init_distributed  # noqa: E402
from training.tasks.pretrain import PretrainTask  # noqa: E402
from training.trainer import Trainer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# op-name fragment -> category, first match wins (self time of each op)
CATEGORIES = [
    ("scaled_dot_product", "attention"), ("flash_attention", "attention"),
    ("aten::mm", "matmul"), ("aten::addmm", "matmul"), ("aten::bmm", "matmul"),
    ("log_softmax", "loss"), ("nll_loss", "loss"), ("cross_entropy", "loss"),
    ("aten::copy_", "casts and copies"), ("aten::_to_copy", "casts and copies"),
    ("CompiledFxGraph", "compiled (fused) kernels"),
]
REGIONS = ("optimizer", "data")  # record_function regions: their total time, ops inside included


def category(name: str) -> str:
    return next((cat for frag, cat in CATEGORIES if frag in name), "elementwise and other ops")


def instrument(trainer: Trainer) -> None:
    """Name the step's phases for the profiler (the trainer's own calls, wrapped)."""
    task, opt = trainer.task, trainer.optimizer
    next_batch, step = task.next_batch, opt.step

    def timed(label, fn):
        def wrapper(*a, **k):
            with record_function(label):
                return fn(*a, **k)
        return wrapper

    task.next_batch, opt.step = timed("data", next_batch), timed("optimizer", step)


def breakdown(trainer: Trainer, steps: int) -> dict:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            trainer.train_step()
        wall = time.perf_counter() - start
    events = prof.key_averages()
    regions = {e.key: e.cpu_time_total / 1e6 for e in events if e.key in REGIONS}
    shares: dict[str, float] = {}
    for e in events:
        if e.key in REGIONS or e.key.startswith(("ProfilerStep", "autograd::engine")):
            continue
        shares[category(e.key)] = shares.get(category(e.key), 0.0) + e.self_cpu_time_total / 1e6
    accounted = sum(shares.values())
    # The regions' ops are in the categories above too; the regions are reported apart, as totals.
    out = {k: round(v / wall, 3) for k, v in sorted(shares.items(), key=lambda kv: -kv[1])}
    out["python and framework"] = round(max(0.0, wall - accounted) / wall, 3)
    for name in REGIONS:
        out[f"region: {name}"] = round(regions.get(name, 0.0) / wall, 3)
    out["ms_per_step_profiled"] = round(1000 * wall / steps, 1)
    return out


def cpu_times(trainer: Trainer, steps: int) -> dict:
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
    return {"wall_ms_per_step": round(1000 * wall / steps, 1),
            "user_ms_per_step": round(1000 * (after.ru_utime - before.ru_utime) / steps, 1),
            "system_ms_per_step": round(1000 * (after.ru_stime - before.ru_stime) / steps, 1),
            "page_faults_per_step": round((after.ru_minflt - before.ru_minflt) / steps),
            "threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cfg = load_spec(str(REPO / "jobs" / "pretrain.yaml"), ["train.log_every=1000000", *args.overrides])
    dist_info = init_distributed(cfg.parallel, cfg.train.device)
    trainer = Trainer(cfg, dist_info, Path(tempfile.mkdtemp(prefix="orch-profile-")), PretrainTask(cfg, dist_info))
    for _ in range(3):  # warm-up: compile, allocator, first shard reads
        trainer.train_step()
    figures = cpu_times(trainer, args.steps)
    instrument(trainer)
    figures["shares"] = breakdown(trainer, args.steps)
    for key, value in figures.items():
        print(f"{key:22s} {value}")
    print("wrote", write_result("cpu_profile", {"steps": args.steps, "overrides": args.overrides}, figures))


if __name__ == "__main__":
    main()
