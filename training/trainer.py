"""One training loop for every job kind. The task supplies batches, the loss and the evaluation.

The loop: build the model on the meta device, parallelize it over the mesh, materialize,
initialize or resume, then step: gradient accumulation, clipping, the optimizer, a scheduled LR,
metrics, validation, checkpoints, and a clean stop on a preemption signal.
"""

from __future__ import annotations

import hashlib
import json
import signal
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from model.config import GPTConfig
from model.gpt import GPT, flops_per_token
from model.parallelize import parallelize
from training import checkpoint as ckpt
from training.cpu_setup import can_compile
from training.metrics import MetricsLogger, peak_flops, say
from training.optim import build_optimizer, lr_at, set_lr

# Exit status of a run stopped by a signal after saving: the executor requeues it.
EXIT_REQUEUE = 3
# With train.time_budget_min, the steps timed (after warm-up) to fit the LR schedule into the budget,
# and the share of the budget left for steps (the rest: validation, checkpoints, the final save).
CALIBRATION_STEPS = (10, 30)
BUDGET_SHARE_FOR_STEPS = 0.9


def steps_within_budget(step: int, seconds_left: float, per_step: float) -> int:
    """The last step that fits in seconds_left at per_step seconds a step, leaving a share for the rest."""
    return step + max(0, int(seconds_left * BUDGET_SHARE_FOR_STEPS / per_step))


def config_hash(cfg) -> str:
    """What must not change across a resume: the model's shape and the data (its fingerprint
    ignores where the shards live and how they are read)."""
    from training.data.prepare import fingerprint

    keyed = {"model": OmegaConf.to_container(cfg.model), "data": fingerprint(cfg.data)}
    return hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:16]


class StopFlag:
    """Set by SIGTERM/SIGUSR2/SIGINT (preemption, time limit, Ctrl-C); checked between steps."""

    def __init__(self):
        self.signal = None
        for sig in (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signal = signum

    def agreed(self, world_size: int, device) -> bool:
        """All ranks must stop at the same step, or the checkpoint collective would hang."""
        if world_size == 1:
            return self.signal is not None
        flag = torch.tensor([0 if self.signal is None else 1], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def model_config(cfg, task) -> GPTConfig:
    """The model's shape: the task's when it starts from an existing model (post-training
    takes the shape of the checkpoint it starts from), else the job's `model:` section."""
    if getattr(task, "model_cfg", None) is not None:
        return task.model_cfg
    model_cfg = GPTConfig(**OmegaConf.to_container(cfg.model))
    if model_cfg.vocab_size is None:
        model_cfg.vocab_size = 64 * ((task.vocab_size + 63) // 64)
    return model_cfg


def build_model(model_cfg: GPTConfig, cfg, dist_info, param_dtype: torch.dtype, *, trainable: bool = True,
                model_class: type = GPT) -> GPT:
    """Build on the meta device (no memory), spread over the mesh, then materialize and initialize.
    Tasks call it too, e.g. for DPO's frozen reference model (trainable=False). model_class: a GPT
    subclass with extra parameters (the reward model's value head); a task names it as `task.model_class`."""
    with torch.device("meta"):
        model = model_class(model_cfg)
    model = parallelize(model, dist_info.mesh, param_dtype=param_dtype,
                        compile=cfg.train.compile and trainable and can_compile(dist_info.device),
                        activation_checkpointing=cfg.train.activation_checkpointing and trainable)
    model.to_empty(device=dist_info.device)
    model.init_weights(seed=cfg.seed)
    if not trainable:
        model.requires_grad_(False)
        model.eval()
    return model


def load_weights(model, init_from: str, is_main: bool = True) -> None:
    """Load `checkpoint.init_from` (a run folder, a checkpoint folder or a Hugging Face folder) into a
    built model. Used for the trained model, and by tasks for frozen copies (DPO's reference)."""
    src = Path(init_from)
    from model.hf import is_hf_folder, load_hf_state_dict

    if is_hf_folder(src):  # an outside Llama-layout checkpoint: full tensors, sharded on load
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        _, state = load_hf_state_dict(src)
        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))
        say(f"initialized weights from the Hugging Face folder {src}", is_main)
        return
    source = ckpt.find_resumable(src) if (src / "checkpoints").is_dir() else src
    if source is None:
        raise ckpt.CheckpointError(f"checkpoint.init_from={init_from!r} has no valid checkpoint")
    ckpt.load_checkpoint(source, model, optimizer=None)
    say(f"initialized weights from {source}", is_main)


def precision(cfg, dist_info) -> tuple[torch.dtype, object]:
    """(FSDP param dtype, autocast context) for train.dtype on this device.

    Sharded GPU jobs get bf16 from FSDP's mixed-precision policy (bf16 compute, fp32 reductions);
    a single process, or gloo on CPUs, gets it from autocast. Master weights stay fp32 either way."""
    on_gpu = dist_info.device.type == "cuda"
    want_bf16 = cfg.train.dtype == "bf16" or (cfg.train.dtype == "auto" and on_gpu)
    fsdp_bf16 = want_bf16 and on_gpu and dist_info.mesh is not None
    use_autocast = want_bf16 and not fsdp_bf16
    autocast = torch.autocast(dist_info.device.type, dtype=torch.bfloat16) if use_autocast else nullcontext()
    return (torch.bfloat16 if fsdp_bf16 else torch.float32), autocast


class Trainer:
    def __init__(self, cfg, dist_info, run_dir: Path, task):
        self.cfg, self.dist, self.run_dir, self.task = cfg, dist_info, run_dir, task
        device = dist_info.device
        self.param_dtype, self.autocast = precision(cfg, dist_info)

        self.model_cfg = model_config(cfg, task)
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True)
        self.model = build_model(self.model_cfg, cfg, dist_info, self.param_dtype,
                                 model_class=getattr(task, "model_class", GPT))
        self.n_params = self.model.num_params()
        self.flops_per_token = flops_per_token(self.model_cfg, cfg.data.seq_len)
        self.optimizer = build_optimizer(self.model, cfg.optim, device)
        self.step = 0
        self.tokens_seen = 0
        # The step the LR schedule ends at: train.max_steps, or fewer when train.time_budget_min can't fit them.
        self.max_steps = cfg.train.max_steps
        self.metrics = MetricsLogger(run_dir, dist_info.is_main, cfg.train.max_steps)
        self.stop = StopFlag()
        self.peak = peak_flops(device)
        self.saver = None
        if cfg.checkpoint.async_save:
            from training.async_checkpoint import AsyncSaver

            self.saver = AsyncSaver(device)
            if device.type == "cpu":
                say("note: checkpoint.async_save on a CPU run: the background write competes with training for the "
                    "cores, so the steps lose about what a synchronous save takes (docs/performance.md); it pays "
                    "off on GPUs", dist_info.is_main)

    # ------------------------------------------------------------ state

    def trainer_state(self) -> dict:
        return {"step": self.step, "tokens_seen": self.tokens_seen, "config_hash": config_hash(self.cfg),
                "max_steps": self.max_steps, "configured_max_steps": self.cfg.train.max_steps,
                "world_size": self.dist.world_size, "task": self.task.state_dict()}

    def resume_or_init(self) -> None:
        """Resume from this run's newest valid checkpoint, or start from init_from, or from scratch."""
        path = ckpt.find_resumable(self.run_dir)
        if path is not None:
            state = ckpt.load_checkpoint(path, self.model, self.optimizer)
            if state.get("config_hash") not in (None, config_hash(self.cfg)):
                say(f"warning: {path} was saved with another model/data config; resuming anyway", self.dist.is_main)
            self.step, self.tokens_seen = state["step"], state["tokens_seen"]
            if state.get("configured_max_steps") == self.cfg.train.max_steps:  # keep a budget-fitted schedule
                self.max_steps = self.metrics.max_steps = state.get("max_steps", self.max_steps)
            self.task.load_state_dict(state["task"])
            say(f"resumed from {path} at step {self.step}", self.dist.is_main)
            return
        if self.cfg.checkpoint.init_from:
            load_weights(self.model, self.cfg.checkpoint.init_from, self.dist.is_main)

    def save(self, background: bool = False) -> Path | None:
        """Write a checkpoint of this step. background=True (with checkpoint.async_save) returns at once."""
        c = self.cfg.checkpoint
        if self.saver is not None:
            committed = self.saver.wait()  # the previous background save, if any
            if committed is not None:
                say(f"checkpoint saved: {committed}", self.dist.is_main)
            if background:
                self.saver.save(self.run_dir, self.step, self.model, self.optimizer, self.trainer_state(),
                                c.keep_last, c.keep_every)
                return None
        path = ckpt.save_checkpoint(self.run_dir, self.step, self.model, self.optimizer, self.trainer_state(),
                                    keep_last=c.keep_last, keep_every=c.keep_every)
        say(f"checkpoint saved: {path}", self.dist.is_main)
        return path

    # ------------------------------------------------------------ loop

    def train_step(self) -> tuple[float, float, int]:
        cfg = self.cfg
        accum = cfg.train.grad_accum_steps
        set_lr(self.optimizer, self.step, cfg.optim, self.max_steps)
        loss_sum = torch.zeros((), device=self.dist.device)
        tokens = 0
        fsdp = hasattr(self.model, "set_requires_gradient_sync")
        for micro in range(accum):
            batch = self.task.next_batch()
            if fsdp:  # reduce-scatter gradients once, on the last micro-batch
                self.model.set_requires_gradient_sync(micro == accum - 1)
            with self.autocast:
                loss = self.task.loss(self.model, batch)
            (loss / accum).backward()
            loss_sum += loss.detach()
            tokens += self.task.tokens_per_batch(batch)
        if cfg.optim.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip, foreach=True)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in self.model.parameters() if p.grad is not None])
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        if self.saver is not None:
            self.saver.wait_staged()  # a background save still copying the weights this step changes
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss = loss_sum / accum
        if self.dist.world_size > 1:  # the logged loss is the mean over data-parallel ranks
            dist.all_reduce(loss, op=dist.ReduceOp.AVG)
        return loss.item(), grad_norm.item(), tokens * self.dist.dp_size

    def fit(self) -> int:
        cfg, is_main = self.cfg, self.dist.is_main
        self.resume_or_init()
        say(f"model: {self.n_params / 1e6:.2f}M parameters, {self.flops_per_token / 1e6:.1f} MFLOP/token; "
            f"world {self.dist.world_size} = dp_replicate {self.dist.dp_replicate} x dp_shard {self.dist.dp_shard} "
            f"x tp {self.dist.tp}; {self.dist.device}, {cfg.train.dtype}", is_main)
        started = time.time()
        window_start, window_tokens, first_step = time.time(), 0, self.step
        budget_s = cfg.train.time_budget_min * 60 if cfg.train.time_budget_min else None
        if cfg.train.val_at_start and self.step == 0 and self.max_steps > 0:
            self.validate()
        while self.step < self.max_steps:
            loss, grad_norm, tokens = self.train_step()
            self.step += 1
            self.tokens_seen += tokens
            window_tokens += tokens
            if budget_s and first_step == 0 and self.step == CALIBRATION_STEPS[0]:
                calibration_start = time.time()
            if budget_s and first_step == 0 and self.step == CALIBRATION_STEPS[1]:
                per_step = (time.time() - calibration_start) / (CALIBRATION_STEPS[1] - CALIBRATION_STEPS[0])
                self.fit_schedule_to_budget(budget_s - (time.time() - started), per_step)
            if self.step % cfg.train.log_every == 0 or self.step == self.max_steps:
                elapsed = time.time() - window_start
                tps = window_tokens / max(elapsed, 1e-9)
                per_step = (time.time() - started) / max(1, self.step - first_step)
                mfu = (tps * self.flops_per_token / self.dist.world_size / self.peak) if self.peak else None
                self.metrics.log({"step": self.step, "loss": loss, "lr": lr_at(self.step - 1, cfg.optim, self.max_steps),
                                  "grad_norm": grad_norm, "tokens_per_s": tps, "tokens_seen": self.tokens_seen,
                                  "mfu": mfu, "eta_s": per_step * (self.max_steps - self.step),
                                  "max_steps": self.max_steps,
                                  # a task's own numbers since the last log (DPO's rewards/*, GRPO's reward and KL)
                                  **(self.task.train_metrics() if hasattr(self.task, "train_metrics") else {})})
                window_start, window_tokens = time.time(), 0
            if cfg.train.val_every and self.step % cfg.train.val_every == 0 and self.step < self.max_steps:
                self.validate()
            if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0 and self.step < self.max_steps:
                self.save(background=True)
            if self.stop.agreed(self.dist.world_size, self.dist.device):
                say(f"stopping on signal {self.stop.signal} at step {self.step}: saving a checkpoint", is_main)
                self.save()
                return EXIT_REQUEUE
            if budget_s and time.time() - started > budget_s:
                say(f"train.time_budget_min={cfg.train.time_budget_min} reached at step {self.step}", is_main)
                break
        result = self.validate()
        path = self.save()
        if is_main:
            summary = {"step": self.step, "tokens_seen": self.tokens_seen, "checkpoint": str(path),
                       "metrics": str(self.run_dir / "metrics.jsonl"), **result,
                       "train_minutes": round((time.time() - started) / 60, 2)}
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
            say(f"done: checkpoint {path}\n      metrics    {self.run_dir / 'metrics.jsonl'}", is_main)
        self.metrics.close()
        if self.saver is not None:
            self.saver.close()
        return 0

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
        say(f"train.time_budget_min={self.cfg.train.time_budget_min}: at {per_step:.2f} s/step, "
            f"{self.max_steps} steps would not fit; the schedule now ends at step {fits}", self.dist.is_main)
        self.max_steps = self.metrics.max_steps = max(fits, self.step + 1)

    def validate(self) -> dict:
        self.model.eval()
        with self.autocast:
            result = self.task.evaluate(self.model)
        self.model.train()
        self.metrics.log({"step": self.step, **result})
        return result
