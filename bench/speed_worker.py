"""One trainer kept warm for bench/trainer_speed.py, run inside the source tree it measures.

    python -c "import runpy, sys; runpy.run_path(sys.argv[1], run_name='__main__')" bench/speed_worker.py [overrides]

Run with that tree as the working directory, so its own training/ package is imported: the baseline
tree of an older commit as well as this one. It builds the demo Trainer with the overrides, runs the
warm-up steps (torch.compile happens there), prints `ready <seconds>`, then answers each `run N` line on
stdin with `done <seconds> <tokens> <user cpu s> <system cpu s>` for N optimizer steps through
Trainer.train_step (loader, schedule, clipping, optimizer: what fit() runs each step).
"""

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


def main() -> None:
    start = time.perf_counter()
    cfg = load_spec("jobs/pretrain.yaml", ["train.log_every=1000000", "train.val_every=0", *sys.argv[1:]])
    dist_info = init_distributed(cfg.parallel, cfg.train.device)
    trainer = Trainer(cfg, dist_info, Path(tempfile.mkdtemp(prefix="orch-speed-")), PretrainTask(cfg, dist_info))
    for _ in range(WARMUP_STEPS):
        trainer.train_step()
    print(f"ready {time.perf_counter() - start:.2f}", flush=True)
    for line in sys.stdin:
        if not line.startswith("run "):
            break
        before, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        tokens = sum(trainer.train_step()[2] for _ in range(int(line.split()[1])))
        seconds, after = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
        print(f"done {seconds:.4f} {tokens} {after.ru_utime - before.ru_utime:.3f} "
              f"{after.ru_stime - before.ru_stime:.3f}", flush=True)


if __name__ == "__main__":
    main()
