"""One training loop for every job kind. The task supplies batches, the loss and the evaluation.

The loop: build the model on the meta device, parallelize it over the mesh, materialize,
initialize or resume, then step: gradient accumulation, clipping, the optimizer, a scheduled LR,
metrics, validation, checkpoints, and a clean stop on a preemption signal or the time budget.

Two rules keep it trustworthy. The loss of a step is the mean over every item (token, pair, ...)
of the step, however the items are split into micro-batches and ranks: tasks return sums and
counts, and the trainer divides once. A step whose loss or gradient norm is not finite changes
nothing (all ranks agree to skip it); too many in a row stop the run, and a non-finite state is
never saved.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from jobspec.contract import EXIT_OK, EXIT_REQUEUE
from jobspec.faults import fault
from model.gpt import flops_per_token
from model.parallelize import vocab_parallel_loss
from training import checkpoint as ckpt
from training import lora_checkpoint
from training import run_folder
from training.build import build_model, load_weights, model_config, precision
from training.goodput import Goodput
from training.metrics import MetricsLogger, Throughput, peak_flops, say
from training.trackers import open_trackers
from training.optim import build_optimizer, lr_at, set_lr
from training.signals import StopFlag
from training.time_budget import CALIBRATION_STEPS, TimeBudget, steps_within_budget
from training.tasks.base import Task


class NonFiniteError(ValueError):
    """Too many steps in a row with a NaN/inf loss or gradient: a user error (the data, the learning rate)."""


def config_hash(cfg) -> str:
    """What must not change across a resume: the model's shape and the data (its fingerprint
    ignores where the shards live and how they are read)."""
    from training.data.prepare import fingerprint

    keyed = {"model": OmegaConf.to_container(cfg.model), "data": fingerprint(cfg.data)}
    return hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:16]


class Trainer:
    def __init__(self, cfg, dist_info, run_dir: Path, task: Task, stop: Optional[StopFlag] = None):
        """stop: set by the entry point's signal handlers (training/signals.py); None = nothing stops us early."""
        self.cfg, self.dist, self.run_dir, self.task = cfg, dist_info, run_dir, task
        device = dist_info.device
        self.param_dtype, self.autocast = precision(cfg, dist_info)
        # Under tensor parallelism the loss is computed on logits sharded over the vocabulary, if the task can.
        vocab_parallel = dist_info.tp > 1 and task.vocab_parallel_loss
        self.loss_context = vocab_parallel_loss if vocab_parallel else nullcontext

        self.model_cfg = model_config(cfg, task)
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True)
        self.model = build_model(self.model_cfg, cfg, dist_info, self.param_dtype, model_class=task.model_class)
        fault("model.build")
        self.n_params = self.model.num_params()
        self.lora_base = None  # LoRA: the base checkpoint's record (training/lora_checkpoint.py)
        self.flops_per_token = flops_per_token(self.model_cfg, cfg.data.seq_len)
        self.optimizer = build_optimizer(self.model, cfg.optim, device)
        self.step = 0
        self.tokens_seen = 0
        self.skipped_steps = 0  # steps whose loss or gradient was not finite: counted, not applied
        self.nonfinite_in_a_row = 0
        self.stop_flags = (False, False)  # (a stop signal, the budget spent): set by each step
        self.saved_step: Optional[int] = None  # the step of the newest checkpoint written or loaded
        # The step the LR schedule ends at: train.max_steps, or fewer when train.time_budget_min can't fit them.
        self.max_steps = cfg.train.max_steps
        self.budget = TimeBudget(cfg.train.time_budget_min)
        trackers = open_trackers(run_dir, cfg.logging.backends, OmegaConf.to_yaml(cfg)) if dist_info.is_main else []
        self.metrics = MetricsLogger(run_dir, dist_info.is_main, cfg.train.max_steps, trackers)
        self.goodput = Goodput(run_dir, dist_info.is_main)  # where the wall time goes: goodput.json
        self.stop = stop or StopFlag()
        self.peak = peak_flops(device)
        self.saver = None
        if cfg.checkpoint.async_save:
            from training.async_checkpoint import AsyncSaver

            self.saver = AsyncSaver(device, timeout_s=cfg.parallel.collective_timeout_s)
            if device.type == "cpu":
                say(
                    "note: checkpoint.async_save on a CPU run: the background write competes with training for the "
                    "cores, so the steps lose about what a synchronous save takes (docs/performance.md); it pays "
                    "off on GPUs",
                    dist_info.is_main,
                )

    # ------------------------------------------------------------ state

    def trainer_state(self) -> dict:
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "config_hash": config_hash(self.cfg),
            "max_steps": self.max_steps,
            "configured_max_steps": self.cfg.train.max_steps,
            "world_size": self.dist.world_size,
            "skipped_steps": self.skipped_steps,
            "budget_used_s": self.budget.used(),
            "task": self.task.state_dict(),
            **({lora_checkpoint.BASE_KEY: self.lora_base} if self.lora_base else {}),
        }

    def resume_or_init(self) -> None:
        """Resume from this run's newest valid checkpoint, or start from init_from, or from scratch."""
        if self.dist.is_main:  # we hold the run folder's lock: no other save can be under way
            for stale in ckpt.clean_unfinished(self.run_dir):
                say(f"removed {stale.name}: left by a save or prune that a crash interrupted", True)
        self.dist.barrier()
        lora = self.cfg.get("lora")
        lora_enabled = lora is not None and lora.enabled
        path = ckpt.find_resumable(self.run_dir, set_damaged_aside=True)
        if path is not None:
            # LoRA: the checkpoint holds adapters only; first the very base they were trained on, checked
            self.lora_base = lora_checkpoint.base_to_resume(path, lora_enabled)
            if self.lora_base is not None:
                load_weights(self.model, self.lora_base["checkpoint"], self.dist.is_main)
            state = ckpt.load_checkpoint(path, self.model, self.optimizer)
            if state.get("config_hash") not in (None, config_hash(self.cfg)):
                say(f"warning: {path} was saved with another model/data config; resuming anyway", self.dist.is_main)
            self.step, self.tokens_seen = state["step"], state["tokens_seen"]
            self.saved_step = self.step
            self.skipped_steps = state.get("skipped_steps", 0)
            self.budget = TimeBudget(self.cfg.train.time_budget_min, used_before=state.get("budget_used_s", 0.0))
            if state.get("configured_max_steps") == self.cfg.train.max_steps:  # keep a budget-fitted schedule
                self.max_steps = self.metrics.max_steps = state.get("max_steps", self.max_steps)
            self.task.load_state_dict(state["task"])
            say(f"resumed from {path} at step {self.step}", self.dist.is_main)
            return
        if lora_enabled and not self.cfg.checkpoint.init_from:
            raise ValueError("lora.enabled needs checkpoint.init_from: adapters train on top of an existing model")
        if self.cfg.checkpoint.init_from:
            load_weights(self.model, self.cfg.checkpoint.init_from, self.dist.is_main)
            if lora_enabled:
                self.lora_base = lora_checkpoint.base_record(
                    self.cfg.checkpoint.init_from, lora.rank, lora.alpha, lora.use_rslora, lora.use_dora
                )

    def save(self, background: bool = False) -> Path | None:
        """Write a checkpoint of this step (never twice the same step, never a non-finite state).
        background=True (with checkpoint.async_save) returns at once."""
        with self.goodput.timing("checkpoint"):  # the time the training thread waits on it
            return self._save(background)

    def _save(self, background: bool) -> Path | None:
        c = self.cfg.checkpoint
        if self.saver is not None:
            committed = self.saver.wait()  # the previous background save, if any
            if committed is not None:
                say(f"checkpoint saved: {committed}", self.dist.is_main)
        path = ckpt.checkpoint_root(self.run_dir) / ckpt.checkpoint_name(self.step)
        if self.saved_step == self.step:
            return path
        self.check_finite_state()
        self.saved_step = self.step
        if self.saver is not None and background:
            self.saver.save(
                self.run_dir, self.step, self.model, self.optimizer, self.trainer_state(), c.keep_last, c.keep_every
            )
            return None
        path = ckpt.save_checkpoint(
            self.run_dir,
            self.step,
            self.model,
            self.optimizer,
            self.trainer_state(),
            keep_last=c.keep_last,
            keep_every=c.keep_every,
        )
        say(f"checkpoint saved: {path}", self.dist.is_main)
        return path

    def check_finite_state(self) -> None:
        """Refuse to save NaN/inf weights or optimizer moments: a checkpoint that verifies but can't train
        would push the good ones out."""
        local = [t.to_local() if hasattr(t, "to_local") else t for t in self.model.parameters()]
        for state in self.optimizer.state.values():
            local += [
                t.to_local() if hasattr(t, "to_local") else t
                for t in state.values()
                if isinstance(t, torch.Tensor) and t.is_floating_point()
            ]
        bad = torch.tensor([0 if all(bool(torch.isfinite(t).all()) for t in local) else 1], device=self.dist.device)
        if self.dist.world_size > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if bad.item():
            raise NonFiniteError(
                f"step {self.step}: the model or optimizer state is not finite (NaN or inf); it was "
                f"not saved, so the checkpoints of {self.run_dir} stay as they were. Resume from "
                "there with a lower optim.lr."
            )

    # ------------------------------------------------------------ loop

    def train_step(self) -> tuple[float, float, int]:
        """One optimizer step over grad_accum_steps micro-batches: (loss, grad norm, tokens on all ranks).
        A non-finite loss or gradient norm leaves the weights and the optimizer as they were.

        One device-to-host read a step, and no other wait on the device: item counts stay on the device, and
        the loss, the gradient norm and the stop flags come back together in one small tensor, which the
        decision to apply the step needs anyway. The stop flags ride on the loss's all-reduce, so every rank
        agrees on them each step without a collective of their own."""
        cfg = self.cfg
        set_lr(self.optimizer, self.step, cfg.optim, self.max_steps)
        sums = torch.zeros(2, dtype=torch.float64, device=self.dist.device)  # loss summed over items, items
        tokens = 0
        # Under FSDP2 every micro-batch's gradients are reduce-scattered as its backward ends (torchtitan's choice):
        # deferring it to the last micro-batch would hold every parameter's unsharded fp32 gradient on each rank
        # meanwhile (27 GB a GPU at 7B) to save grad_accum_steps - 1 reduce-scatters. HSDP's all-reduce across
        # replicas (the network, between nodes) waits for the last micro-batch: it sums the accumulated shards.
        hsdp = hasattr(self.model, "set_requires_all_reduce")
        for micro in range(cfg.train.grad_accum_steps):
            batch = self.task.next_batch()
            if hsdp:
                self.model.set_requires_all_reduce(micro == cfg.train.grad_accum_steps - 1)
            with self.loss_context():
                with self.autocast:
                    total, count = self.task.loss(self.model, batch)
                if fault("train.loss", step=self.step + 1) == "nan":
                    total = total * float("nan")
                total.backward()
            sums[0] += total.detach().double()
            # a count is a Python number (added without a copy to the device) or a tensor already there
            sums[1] += count.double() if isinstance(count, torch.Tensor) else count
            tokens += self.task.tokens_per_batch(batch)
        # (a stop signal, the time budget spent), sampled once the step's work is queued
        flags = torch.tensor([self.stop.signal is not None, self.budget.spent()], dtype=torch.float64)
        sums = torch.cat([sums, flags.to(self.dist.device, non_blocking=True)])
        if self.dist.world_size > 1:  # the step's items on every rank (tensor-parallel peers count theirs alike)
            dist.all_reduce(sums)
        items = sums[1].clamp(min=1)
        # FSDP averaged the gradients of the summed losses over data-parallel ranks: make them the gradient of
        # the mean over all of the step's items. sums[1] counts each item tp times, as world_size counts ranks.
        # (a tensor's numerator: `number / tensor` multiplies by a reciprocal, one rounding more than before)
        scale = torch.full((), self.dist.world_size, dtype=torch.float64, device=items.device) / items
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        for g in grads:
            g.mul_(scale)
        if cfg.optim.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip, foreach=True)
        else:
            grad_norm = torch.nn.utils.get_total_norm(grads)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        # the step's one read: loss, gradient norm, and the flags every rank agreed on
        loss, grad_norm, signal, spent = torch.stack([sums[0] / items, grad_norm.double(), *sums[2:]]).tolist()
        self.stop_flags = (signal > 0, spent > 0)
        fault("train.before_optimizer_step", step=self.step + 1)
        if self.saver is not None:
            self.saver.wait_staged()  # a background save still copying the weights this step changes
        if math.isfinite(loss) and math.isfinite(grad_norm):  # the same on every rank: both are reduced
            self.optimizer.step()
            self.nonfinite_in_a_row = 0
        else:
            self.note_nonfinite_step(loss, grad_norm)
        self.optimizer.zero_grad(set_to_none=True)
        fault("train.after_optimizer_step", step=self.step + 1)
        return loss, grad_norm, tokens * self.dist.dp_size

    def note_nonfinite_step(self, loss: float, grad_norm: float) -> None:
        self.skipped_steps += 1
        self.nonfinite_in_a_row += 1
        limit = self.cfg.train.max_nonfinite_steps
        say(
            f"step {self.step + 1}: loss {loss} / gradient norm {grad_norm} is not finite: the step is skipped "
            f"({self.nonfinite_in_a_row} in a row, train.max_nonfinite_steps={limit})",
            self.dist.is_main,
        )
        if self.nonfinite_in_a_row >= limit:
            raise NonFiniteError(
                f"the loss or gradient norm was not finite for {limit} steps in a row (up to step "
                f"{self.step + 1}; train.max_nonfinite_steps={limit}). Nothing of those steps was "
                f"applied or saved; the newest checkpoint in {self.run_dir} is good. Lower optim.lr, "
                "check the data, or raise optim.warmup_steps, then resume."
            )

    def should_stop(self) -> tuple[bool, bool]:
        """(a stop signal, the time budget spent), agreed by every rank: they must stop at the same step, or
        the checkpoint collective would hang. train_step brought them back with the step's loss, so a signal is
        acted on at the end of the step it arrived in, or of the next one if it came after the step's work was
        queued: a stop waits at most two steps (the grace of training/signals.py covers them and the save). A lone
        process reads its own flags at the end of the step, a host read that waits on nothing."""
        if self.dist.world_size == 1:  # nothing to agree on: the host's own flags, as they are now
            return self.stop.signal is not None, self.budget.spent()
        return self.stop_flags

    def fit(self) -> int:
        cfg, is_main = self.cfg, self.dist.is_main
        if is_main:  # what this run trains, for whoever reads the folder later (training/run_folder.py)
            run_folder.write_artifacts(self.run_dir, self.model_cfg, self.task.tokenizer_file)
        self.resume_or_init()
        if self.lora_base:
            from model.lora import trainable_share

            trainable, total = trainable_share(self.model)
            say(
                f"LoRA: {trainable:,} of {total:,} parameters train ({100 * trainable / total:.2f}%); base "
                f"{self.lora_base['checkpoint']}",
                is_main,
            )
        say(
            f"model: {self.n_params / 1e6:.2f}M parameters, {self.flops_per_token / 1e6:.1f} MFLOP/token; "
            f"world {self.dist.world_size} = dp_replicate {self.dist.dp_replicate} x dp_shard {self.dist.dp_shard} "
            f"x tp {self.dist.tp}; {self.dist.device}, {cfg.train.dtype}",
            is_main,
        )
        started, first_step = time.monotonic(), self.step
        throughput = Throughput(self.flops_per_token, self.dist.world_size, self.peak)
        self.goodput.training_starts()
        if cfg.train.val_at_start and self.step == 0 and self.max_steps > 0:
            self.validate()
        while self.step < self.max_steps:
            step_started = time.perf_counter()
            with throughput.timing():  # tokens/s and MFU count training time only
                loss, grad_norm, tokens = self.train_step()
            self.step += 1
            self.goodput.step_done(self.step, time.perf_counter() - step_started)
            self.tokens_seen += tokens
            throughput.add(tokens)
            self.calibrate_budget(first_step)
            if self.step % cfg.train.log_every == 0 or self.step == self.max_steps:
                per_step = (time.monotonic() - started) / max(1, self.step - first_step)
                self.metrics.log(
                    {
                        "step": self.step,
                        "loss": loss,
                        "lr": lr_at(self.step - 1, cfg.optim, self.max_steps),
                        "grad_norm": grad_norm,
                        **throughput.take(),
                        "tokens_seen": self.tokens_seen,
                        "eta_s": per_step * (self.max_steps - self.step),
                        "max_steps": self.max_steps,
                        "skipped_steps": self.skipped_steps,
                        # a task's own numbers since the last log (DPO's rewards/*, GRPO's reward and KL)
                        **self.task.train_metrics(),
                    }
                )
                self.goodput.flush()
            if cfg.train.val_every and self.step % cfg.train.val_every == 0 and self.step < self.max_steps:
                self.validate()
            if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0 and self.step < self.max_steps:
                self.save(background=True)
            stop_signal, budget_spent = self.should_stop()
            if stop_signal:
                say(f"stopping on signal {self.stop.signal} at step {self.step}: saving a checkpoint", is_main)
                self.save()
                self.close()
                return EXIT_REQUEUE
            if budget_spent:
                say(f"train.time_budget_min={cfg.train.time_budget_min} reached at step {self.step}", is_main)
                break
        result = self.validate()
        path = self.save()
        if is_main:
            summary = {
                "step": self.step,
                "tokens_seen": self.tokens_seen,
                "checkpoint": str(path),
                "metrics": str(self.metrics.path),
                "skipped_steps": self.skipped_steps,
                **result,
                "train_minutes": round((time.monotonic() - started) / 60, 2),
            }
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
            say(f"done: checkpoint {path}\n      metrics    {self.metrics.path}", is_main)
        self.close()
        return EXIT_OK

    def close(self) -> None:
        """Finish a background save (its error, if any, is raised here) and close the metrics file."""
        if self.saver is not None:
            self.saver.close()
        self.metrics.close()
        self.goodput.flush()

    def calibrate_budget(self, first_step: int) -> None:
        """With train.time_budget_min, time steps CALIBRATION_STEPS of a fresh run and fit the schedule to it."""
        if not self.budget.limited or first_step != 0:
            return
        if self.step == CALIBRATION_STEPS[0]:
            self._calibration_start = time.monotonic()  # a wall-clock jump can't move a monotonic clock
        elif self.step == CALIBRATION_STEPS[1]:
            per_step = (time.monotonic() - self._calibration_start) / (CALIBRATION_STEPS[1] - CALIBRATION_STEPS[0])
            self.fit_schedule_to_budget(self.budget.left(), per_step)

    def fit_schedule_to_budget(self, seconds_left: float, per_step: float) -> None:
        """On a machine too slow for train.max_steps within train.time_budget_min, end the LR schedule
        at the step the budget allows, so the run still anneals fully instead of being cut off at a
        high learning rate. Every rank takes rank 0's figure (they must stop at the same step)."""
        fits = steps_within_budget(self.step, seconds_left, per_step)
        if self.dist.world_size > 1:
            value = torch.tensor([fits], device=self.dist.device)
            dist.broadcast(value, src=0)
            fits = int(value.item())
        if fits >= self.max_steps:
            return
        say(
            f"train.time_budget_min={self.cfg.train.time_budget_min}: at {per_step:.2f} s/step, "
            f"{self.max_steps} steps would not fit; the schedule now ends at step {fits}",
            self.dist.is_main,
        )
        self.max_steps = self.metrics.max_steps = max(fits, self.step + 1)

    def validate(self) -> dict:
        fault("train.validation", step=self.step)
        self.model.eval()
        with self.autocast, self.goodput.timing("validation"):
            result = self.task.evaluate(self.model)
        self.model.train()
        self.metrics.log({"step": self.step, **result})
        return result
