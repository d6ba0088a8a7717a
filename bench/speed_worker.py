"""One trainer kept warm for bench/trainer_speed.py, run inside the source tree it measures.

    python -c "import runpy, sys; runpy.run_path(sys.argv.pop(1), run_name='__main__')" bench/speed_worker.py [overrides]

Run with that tree as the working directory, so that its own training/ package is imported: the
baseline tree of an older commit as well as this one. It builds the demo Trainer with the overrides,
runs the warm-up steps (torch.compile happens there), prints `ready <seconds>`, then answers lines on stdin:
  run N      -> `done <seconds> <tokens> <user cpu s> <system cpu s> <page faults>` for N optimizer steps
                through Trainer.train_step (loader, schedule, clipping, optimizer: what fit() runs a step);
  profile N  -> `profile <json>`: where N steps' time goes (torch.profiler), as shares of their wall time.
"""

import inspect
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

if Path("training/cpu_setup.py").is_file():  # this tree bounds its OpenMP threads' spinning before torch loads
    from training.cpu_setup import set_openmp_wait_policy

    set_openmp_wait_policy()
# The job contract moved from orchestrator.spec to jobspec: use the one this tree has (an installed
# copy of the other tree must not answer instead).
if Path("jobspec").is_dir():
    from jobspec import load_spec
else:
    from orchestrator.spec import load_spec

from training.distributed import init_distributed
from training.tasks.pretrain import PretrainTask
from training.trainer import Trainer

WARMUP_STEPS = 3
# op-name fragment -> category, first match wins; each op's self time is counted once
CATEGORIES = [
    ("scaled_dot_product", "attention"), ("flash_attention", "attention"),
    ("aten::mm", "matmul"), ("aten::addmm", "matmul"), ("aten::bmm", "matmul"),
    ("log_softmax", "loss (softmax, nll)"), ("nll_loss", "loss (softmax, nll)"),
    ("aten::copy_", "casts and copies"), ("aten::_to_copy", "casts and copies"),
    ("CompiledFxGraph", "compiled (fused) kernels"), ("Torch-Compiled Region", "compiled (fused) kernels"),
]


def run(trainer, steps: int) -> str:
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    tokens = sum(trainer.train_step()[2] for _ in range(steps))
    seconds, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
    return (f"done {seconds:.4f} {tokens} {after.ru_utime - before.ru_utime:.3f} "
            f"{after.ru_stime - before.ru_stime:.3f} {after.ru_minflt - before.ru_minflt}")


def profile(trainer, steps: int) -> str:
    """Shares of the steps' wall time: op categories (self time, main thread), the optimizer step and
    the data loader (wrapped in named regions), and what no op accounts for (Python, autograd, dispatch)."""
    import torch
    from torch.profiler import ProfilerActivity, record_function

    def named(label, fn):
        def wrapper(*args, **kwargs):
            with record_function(label):
                return fn(*args, **kwargs)
        return wrapper

    trainer.task.next_batch = named("region: data", trainer.task.next_batch)
    trainer.optimizer.step = named("region: optimizer step", trainer.optimizer.step)
    with torch.profiler.profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            trainer.train_step()
        wall = time.perf_counter() - start
    shares: dict = {}
    for e in prof.key_averages():
        if e.key.startswith("region: "):
            shares[e.key] = e.cpu_time_total / 1e6 / wall
        elif not e.key.startswith(("ProfilerStep", "autograd::engine", "Optimizer.")):
            cat = next((c for frag, c in CATEGORIES if frag in e.key), "elementwise and other ops")
            shares[cat] = shares.get(cat, 0.0) + e.self_cpu_time_total / 1e6 / wall
    ops = sum(v for k, v in shares.items() if not k.startswith("region: "))
    shares["python, autograd, dispatch"] = max(0.0, 1.0 - ops)
    shares = {k: round(v, 3) for k, v in sorted(shares.items(), key=lambda kv: -kv[1])}
    return "profile " + json.dumps({"ms_per_step_profiled": round(1000 * wall / steps, 1), "shares": shares})


def main() -> None:
    start = time.perf_counter()
    cfg = load_spec("jobs/pretrain.yaml", ["train.log_every=1000000", "train.val_every=0", *sys.argv[1:]])
    dist_info = init_distributed(cfg.parallel, cfg.train.device)
    run_dir = Path(tempfile.mkdtemp(prefix="orch-speed-"))
    # An older tree's Task (before the Task protocol took the run folder) is built without it.
    takes_run_dir = "run_dir" in inspect.signature(PretrainTask).parameters
    task = PretrainTask(cfg, dist_info, run_dir) if takes_run_dir else PretrainTask(cfg, dist_info)
    trainer = Trainer(cfg, dist_info, run_dir, task)
    for _ in range(WARMUP_STEPS):
        trainer.train_step()
    print(f"ready {time.perf_counter() - start:.2f}", flush=True)
    for line in sys.stdin:
        command, _, steps = line.partition(" ")
        if command == "run":
            print(run(trainer, int(steps)), flush=True)
        elif command == "profile":
            print(profile(trainer, int(steps)), flush=True)
        else:
            break


if __name__ == "__main__":
    main()
