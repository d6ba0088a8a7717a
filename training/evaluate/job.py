"""The eval job (kind: eval): measure one model, or every stage of a pipeline, and write eval.json
(and report.md with its plots) in the run folder.

    orch submit jobs/eval.yaml eval.source=runs/pretrain-1a2b3c
    orch submit jobs/eval.yaml eval.compare='[pretrain=runs/pretrain-1a2b3c,sft=runs/sft-4d5e6f]'

eval.json holds, per model, a flat dict of metrics named "<set or task>/<metric>": "val/perplexity",
"val/bpb", "stdlib_continuation/acc", "python_functions/parses", ... The job runs in one process:
its batches are small and a model that trained sharded is saved whole (training/checkpoint.py).
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import torch
from omegaconf import OmegaConf

from jobspec import atomic
from training.evaluate.tasks import EvalError, Task, load_task
from training.posttrain.collapse import STATS as COLLAPSE_STATS
from training.posttrain.collapse import collapsed_tasks
from training.run_folder import is_chat_model, is_hf_folder, load_model, resolve_checkpoint
from training.trackers import log_results


def _stages(cfg) -> list[tuple[str, str]]:
    """(name, folder) of every model to measure: eval.compare's stages, else the source."""
    stages = []
    for entry in cfg.eval.compare:
        name, sep, folder = str(entry).partition("=")
        if not sep:
            name, folder = _kind_of(entry), entry
        if not Path(folder).is_dir():
            raise EvalError(
                f"key 'eval.compare' has the entry {entry!r}, but {folder!r} is not a folder "
                "(write STAGE=RUN_FOLDER, e.g. sft=runs/sft-4d5e6f)"
            )
        stages.append((_unique(name, stages), folder))
    source = cfg.eval.source or cfg.checkpoint.init_from
    if source and not any(Path(f).resolve() == Path(source).resolve() for _, f in stages):
        stages.append((_unique(_kind_of(source), stages), source))
    if not stages:
        raise EvalError(
            "nothing to evaluate: set eval.source (a run, checkpoint or Hugging Face folder), "
            "checkpoint.init_from, or eval.compare"
        )
    return stages


def _unique(name: str, stages: list[tuple[str, str]]) -> str:
    taken = {n for n, _ in stages}
    unique, k = name, 2
    while unique in taken:
        unique, k = f"{name}-{k}", k + 1
    return unique


def _kind_of(folder: str) -> str:
    """A stage's default name: its run's kind (pretrain, sft, ...), else the folder's name."""
    for config in (Path(folder) / "config.yaml", Path(folder).parent.parent / "config.yaml"):
        if config.is_file():
            return str(OmegaConf.load(config).get("kind") or Path(folder).name)
    return Path(folder).name


def _heldout_sets(cfg, tokenizer) -> list[tuple[str, object]]:
    """(name, data section) per eval.heldout entry: "val" = data.dir's val split, or another prepared data folder's."""
    from training.data.prepare import ensure_data

    sets = []
    for entry in cfg.eval.heldout:
        data_cfg = cfg.data.copy()
        if entry == "val":
            # Prepared data is read as it is (whatever settings made it): only its tokenizer must match.
            # Missing, it is prepared from this job's data section, as pretraining would.
            if not (Path(cfg.data.dir) / "meta.json").is_file():
                ensure_data(cfg.data, progress=True)
            name = "val"
        else:
            if not (Path(entry) / "val").is_dir():
                raise EvalError(
                    f"key 'eval.heldout' has the entry {entry!r}: give 'val' (the val split of "
                    f"data.dir={cfg.data.dir!r}) or a prepared data folder with a val/ split"
                )
            data_cfg.dir, data_cfg.remote, name = entry, None, Path(entry).name
        sets.append((name, data_cfg))
    return sets


def _check_same_tokenizer(data_dir: str, tokenizer, source: str) -> None:
    """Perplexity over data tokenized by another tokenizer would be meaningless: refuse it."""
    from training.data.tokenizer import load_tokenizer

    theirs = load_tokenizer(Path(data_dir) / "tokenizer.json").get_vocab(with_added_tokens=True)
    if theirs != tokenizer.get_vocab(with_added_tokens=True):
        raise EvalError(
            f"{data_dir}/tokenizer.json is not the tokenizer of {source}: the held-out data must be "
            "tokenized by the model's own tokenizer (set data.dir to the data it was trained on, "
            "or eval.heldout=[] to skip perplexity)"
        )


def evaluate_model(model, tokenizer, source: str, heldout_sets, tasks: list[Task], cfg, autocast) -> dict:
    """Every metric of one model, as a flat dict "<set or task>/<metric>" -> number."""
    from training.data.tokenizer import token_byte_lengths
    from training.evaluate import scoring

    metrics: dict = {}
    batch = cfg.train.micro_batch_size
    if heldout_sets:
        byte_lengths = torch.tensor(token_byte_lengths(tokenizer), dtype=torch.float64)
    for name, data_cfg in heldout_sets:
        _check_same_tokenizer(data_cfg.dir, tokenizer, source)
        result = scoring.heldout(model, data_cfg, batch, cfg.train.val_batches, byte_lengths, autocast)
        metrics.update({f"{name}/{k}": v for k, v in result.items()})
    samples, loglikelihoods = {}, {}
    chat = is_chat_model(source)  # generation tasks ask a post-trained model in its chat format
    for task in tasks:
        if task.output_type == "multiple_choice":
            result = scoring.multiple_choice(model, tokenizer, task, batch, autocast)
            loglikelihoods[task.name] = result.pop("loglikelihoods")  # per record, per choice: to compare
        else:
            result = scoring.generation(model, tokenizer, task, batch, autocast, chat=chat)
            samples[task.name] = result.pop("samples")
        metrics.update(
            {f"{task.name}/{k}": v for k, v in result.items() if k in task.metrics or k == "n" or k in COLLAPSE_STATS}
        )
    return {"metrics": metrics, "samples": samples, "loglikelihoods": loglikelihoods}


def run_eval(cfg, dist_info, run_dir: Path) -> int:
    if dist_info.world_size > 1:
        raise EvalError(
            f"the eval job runs in one process, but it was started with {dist_info.world_size}: "
            "set resources.nproc_per_node=1 and resources.nodes=1"
        )
    device = dist_info.device
    bf16 = cfg.train.dtype == "bf16" or (cfg.train.dtype == "auto" and device.type == "cuda")
    autocast = partial(torch.autocast, device.type, dtype=torch.bfloat16) if bf16 else nullcontext
    stages = _stages(cfg)
    tasks = [load_task(t, cfg.eval.max_examples) for t in cfg.eval.tasks]
    results: dict = {"stages": {}}
    heldout_sets = None
    for name, source in stages:
        start = time.time()
        model, tokenizer = load_model(source, device)
        if heldout_sets is None:
            heldout_sets = _heldout_sets(cfg, tokenizer)
        measured = evaluate_model(model, tokenizer, source, heldout_sets, tasks, cfg, autocast)
        if is_hf_folder(source):  # a Hugging Face folder: no run, no loss curve
            source_run, checkpoint = None, str(Path(source).resolve())
        else:
            source_run, checkpoint = (str(p) for p in resolve_checkpoint(source))
        results["stages"][name] = {
            "source": str(Path(source).resolve()),
            "run_dir": source_run,
            "checkpoint": checkpoint,
            **measured,
        }
        shown = ", ".join(
            f"{k} {v:.4g}"
            for k, v in measured["metrics"].items()
            if not k.endswith("/n")
            and k.rsplit("/", 1)[1] in ("perplexity", "bpb", "acc", "acc_norm", "parses", "passes")
        )
        print(f"{name}: {shown} ({time.time() - start:.0f}s)", flush=True)
        for task, reasons in collapsed_tasks(measured["metrics"]).items():
            print(
                f"warning: {name}'s completions on {task} have collapsed ({', '.join(reasons)}): its "
                f"{task}/parses is no progress",
                flush=True,
            )
        del model
    last = list(results["stages"])[-1]
    results["metrics"] = results["stages"][last]["metrics"]  # the source's, or the last stage's
    results["tasks"] = {t.name: str(t.path) for t in tasks}
    _write_json(run_dir / "eval.json", results)
    print(f"wrote {run_dir / 'eval.json'}", flush=True)
    every_stage = {f"{s}/{k}": v for s, body in results["stages"].items() for k, v in body["metrics"].items()}
    log_results(run_dir, cfg.logging.backends, OmegaConf.to_yaml(cfg), every_stage)  # W&B, MLflow, TensorBoard
    if cfg.eval.report:
        from training.evaluate.report import write_report

        path = write_report(run_dir, results)
        print(f"wrote {path}", flush=True)
    return 0


def _write_json(path: Path, obj) -> None:
    atomic.write_json(path, obj)
