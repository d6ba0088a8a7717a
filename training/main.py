"""The one entry point that runs on the nodes, however it was launched:

    python -m training.main jobs/pretrain.yaml train.max_steps=50            # one process
    torchrun --nproc_per_node 4 -m training.main jobs/pretrain.yaml parallel.tp=2
    srun python -m training.main ...                                          # Slurm tasks

Without --run-dir the run folder is `<runs_dir>/<name>`: running the same command again
resumes from its newest checkpoint.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from omegaconf import OmegaConf

from orchestrator.spec import SpecError, load_spec


USER_ERROR = "user_error.txt"  # written on a user error; the executors then don't retry


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m training.main", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="job YAML file")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=50")
    p.add_argument("--run-dir", help="run folder (default: <runs_dir>/<name>)")
    return p.parse_args(argv)


# Each job kind's task: how it builds batches, its loss and its evaluation (training/tasks/).
TASKS = {
    "pretrain": "training.tasks.pretrain:PretrainTask",
    "sft": "training.tasks.sft:SFTTask",
    "rm": "training.tasks.rm:RewardModelTask",
    "dpo": "training.tasks.dpo:DPOTask",
    "grpo": "training.tasks.grpo:GRPOTask",
}

# Kinds that don't train: a function run(cfg, dist_info, run_dir) -> exit code instead of a task.
RUNNERS = {
    "eval": "training.evaluate.job:run_eval",
}


def build_task(cfg, dist_info):
    import importlib

    module, name = TASKS[cfg.kind].split(":")
    return getattr(importlib.import_module(module), name)(cfg, dist_info)


def run(argv=None) -> int:
    from training.cpu_setup import set_openmp_wait_policy

    set_openmp_wait_policy()  # before torch loads: libgomp reads it then
    args = parse_args(argv)
    try:
        cfg = load_spec(args.config, args.overrides)
    except SpecError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    # Imported after the spec check so a typo fails fast, before torch loads.
    from training import checkpoint as ckpt
    from training.data import DataError
    from training.distributed import init_distributed, shutdown
    from training.trainer import Trainer

    run_dir = Path(args.run_dir or os.path.join(cfg.runs_dir, cfg.name))
    try:
        dist_info = init_distributed(cfg.parallel, cfg.train.device)
        if dist_info.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            OmegaConf.save(cfg, run_dir / "config.yaml")
        dist_info.barrier()
        if cfg.kind in RUNNERS:
            import importlib

            module, name = RUNNERS[cfg.kind].split(":")
            return getattr(importlib.import_module(module), name)(cfg, dist_info, run_dir)
        task = build_task(cfg, dist_info)
        if dist_info.is_main and getattr(task, "model_cfg", None) is not None:
            # Post-training runs take the source's shape: config.yaml records it for later stages and exports.
            from dataclasses import asdict

            saved = OmegaConf.load(run_dir / "config.yaml")
            saved.model = asdict(task.model_cfg)
            OmegaConf.save(saved, run_dir / "config.yaml")
        trainer = Trainer(cfg, dist_info, run_dir, task)
        return trainer.fit()
    except (SpecError, DataError, ckpt.CheckpointError, ValueError) as e:
        # A user error: retrying won't help. torchrun turns every failure into exit code 1,
        # so the executors learn it from this file instead.
        print(f"error: {e}", file=sys.stderr)
        if int(os.environ.get("RANK", "0")) == 0:
            (run_dir / "logs").mkdir(parents=True, exist_ok=True)
            (run_dir / "logs" / USER_ERROR).write_text(str(e) + "\n")
        return 2
    finally:
        shutdown()


def main() -> None:
    sys.exit(run())


if __name__ == "__main__":
    main()
