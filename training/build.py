"""Building the model a job trains: its shape, on the meta device, spread over the mesh, materialized,
initialized or loaded, and the precision it computes in. The trainer uses it, and tasks that need a
second model (DPO's frozen reference, GRPO's reward model) call it too."""

from __future__ import annotations

import sys
from contextlib import nullcontext
from pathlib import Path

import torch
from omegaconf import OmegaConf

from model.config import GPTConfig
from model.gpt import GPT
from model.parallelize import parallelize
from training import checkpoint as ckpt
from training import run_folder
from training.cpu_setup import can_compile
from training.metrics import say
from training.tasks.base import Task


def model_config(cfg, task: Task) -> GPTConfig:
    """The model's shape: the task's when it starts from an existing model (post-training
    takes the shape of the checkpoint it starts from), else the job's `model:` section."""
    if task.model_cfg is not None:
        return task.model_cfg
    model_cfg = GPTConfig(**OmegaConf.to_container(cfg.model))
    if model_cfg.vocab_size is None:
        model_cfg.vocab_size = 64 * ((task.vocab_size + 63) // 64)
    return model_cfg


def compiles(cfg, dist_info) -> bool:
    """train.compile where it works. Under tensor parallelism torch 2.14's DTensor backward fails on the
    compiled blocks' outputs (AttributeError: 'Tensor' object has no attribute '_local_tensor', in
    redistribute's backward): train eager there, and say so, rather than crash at the first step."""
    if not cfg.train.compile:
        return False
    if dist_info.tp > 1:
        if dist_info.rank == 0:
            print(
                "note: train.compile is not used with parallel.tp > 1 (torch 2.14's DTensor backward fails on "
                "compiled blocks); training eager",
                file=sys.stderr,
                flush=True,
            )
        return False
    return can_compile(dist_info.device)


def build_model(
    model_cfg: GPTConfig, cfg, dist_info, param_dtype: torch.dtype, *, trainable: bool = True, model_class: type = GPT
) -> GPT:
    """Build on the meta device (no memory), spread over the mesh, then materialize and initialize.
    Tasks call it too, e.g. for DPO's frozen reference model (trainable=False). model_class: a GPT
    subclass with extra parameters (the reward model's value head); a task names it as `task.model_class`."""
    with torch.device("meta"):
        model = model_class(model_cfg)
    lora = cfg.get("lora")
    if trainable and lora is not None and lora.enabled:  # adapters join before FSDP shards the blocks
        from model.lora import apply_lora

        apply_lora(
            model,
            lora.rank,
            lora.alpha,
            list(lora.target_modules),
            lora.dropout,
            [*lora.modules_to_save, *getattr(model, "lora_modules_to_save", ())],
            use_rslora=lora.get("use_rslora", False),
            use_dora=lora.get("use_dora", False),
        )
    model = parallelize(
        model,
        dist_info.mesh,
        param_dtype=param_dtype,
        compile=trainable and compiles(cfg, dist_info),
        activation_checkpointing=cfg.train.activation_checkpointing and trainable,
    )
    model.to_empty(device=dist_info.device)
    model.init_weights(seed=cfg.seed)
    if getattr(model, "checkpoint_keys", None) is not None:
        from model.lora import init_lora_weights

        init_lora_weights(model, seed=cfg.seed)
    if not trainable:
        model.requires_grad_(False)
        model.eval()
    return model


def load_weights(model, init_from: str, is_main: bool = True) -> None:
    """Load `checkpoint.init_from` (a run folder, a checkpoint folder or a Hugging Face folder) into a
    built model. Used for the trained model, and by tasks for frozen copies (DPO's reference)."""
    src = Path(init_from)
    if run_folder.is_hf_folder(src):  # an outside Llama-layout checkpoint: full tensors, sharded on load
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        from training.hf_import import load_hf_state_dict

        _, state = load_hf_state_dict(src)
        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))
        say(f"initialized weights from the Hugging Face folder {src}", is_main)
        return
    source = ckpt.find_resumable(src) if (src / "checkpoints").is_dir() else src
    if source is None:
        raise ckpt.CheckpointError(f"checkpoint.init_from={init_from!r} has no valid checkpoint")
    from training.lora_checkpoint import base_of

    if base_of(source) is not None:  # a LoRA run's adapters: its base with them merged, as full tensors
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        state = run_folder.read_checkpoint_model(source)
        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))
    else:  # every tensor, also into a LoRA model (whose own checkpoints hold only its adapters)
        ckpt.load_checkpoint(source, model, optimizer=None, whole=True)
    say(f"initialized weights from {source}", is_main)


def precision(cfg, dist_info) -> tuple[torch.dtype, object]:
    """(FSDP param dtype, autocast context) for train.dtype on this device.

    Sharded GPU jobs get bf16 from FSDP's mixed-precision policy (bf16 compute, fp32 reductions); every
    other job gets it from autocast: one process, gloo on CPUs, and tensor parallel without data parallel,
    where no FSDP is applied (model/parallelize.py) to carry a policy. Master weights stay fp32 either way."""
    on_gpu = dist_info.device.type == "cuda"
    want_bf16 = cfg.train.dtype == "bf16" or (cfg.train.dtype == "auto" and on_gpu)
    fsdp_bf16 = want_bf16 and on_gpu and dist_info.dp_size > 1
    use_autocast = want_bf16 and not fsdp_bf16
    autocast = torch.autocast(dist_info.device.type, dtype=torch.bfloat16) if use_autocast else nullcontext()
    return (torch.bfloat16 if fsdp_bf16 else torch.float32), autocast
