"""One training step of the job, measured in the fake world (world.py): memory, collectives and FLOPs per GPU.

The model is the trainer's (model/parallelize.py: the job's TP, activation checkpointing and FSDP2 on its mesh,
as training/build.py `build_model` applies them), the optimizer the trainer's (training/optim.py), the step the
trainer's (micro-batches, loss, backward, clipping, optimizer step), all on FakeTensors: shapes without memory.
Memory is counted by torch's FSDPMemTracker when FSDP2 wraps the model: it knows FSDP's own buffers (all-gather
outputs, reduce-scatter inputs, sharded and unsharded parameters) and says which is which; a model without FSDP
(one GPU, tensor parallel alone) gets its base class MemTracker, which FSDPMemTracker refuses to stand in for.

Two steps run and the second is measured: the first builds the optimizer's state and runs DTensor's sharding
propagation for each new op, which under FakeTensorMode allocates global-shaped tensors the tracker would count
(a 1.3B model's AdamW step read 22 GiB on rank 0 of 8 instead of 2.6). The second is the steady state a run lives in.
Not planned: train.compile (the eager step is measured; compiled blocks save no more than it), the CUDA context and
NCCL's buffers and the allocator's fragmentation (1-3 GiB a GPU: report.py adds a margin).
"""

from __future__ import annotations

import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from model.config import GPTConfig
from model.gpt import GPT
from model.parallelize import parallelize, token_cross_entropy, vocab_parallel_loss
from training.build import precision
from training.optim import build_optimizer

c10d, funcol = torch.ops.c10d, torch.ops._c10d_functional
# collective op -> (what it does, where its inputs are among the op's arguments)
COLLECTIVES = {
    c10d._allgather_base_.default: ("all-gather", 1),
    c10d.allgather_into_tensor_coalesced_.default: ("all-gather", 1),
    c10d._reduce_scatter_base_.default: ("reduce-scatter", 1),
    c10d.reduce_scatter_tensor_coalesced_.default: ("reduce-scatter", 1),
    c10d.allreduce_.default: ("all-reduce", 0),
    c10d.allreduce_coalesced_.default: ("all-reduce", 0),
    c10d.broadcast_.default: ("broadcast", 0),
    c10d.alltoall_base_.default: ("all-to-all", 1),
    funcol.all_gather_into_tensor.default: ("all-gather", 0),
    funcol.all_gather_into_tensor_coalesced.default: ("all-gather", 0),
    funcol.reduce_scatter_tensor.default: ("reduce-scatter", 0),
    funcol.reduce_scatter_tensor_coalesced.default: ("reduce-scatter", 0),
    funcol.all_reduce.default: ("all-reduce", 0),
    funcol.all_reduce_.default: ("all-reduce", 0),
    funcol.all_to_all_single.default: ("all-to-all", 0),
    funcol.broadcast.default: ("broadcast", 0),
}
# A ring all-gather or reduce-scatter sends (n-1)/n of the whole tensor from each rank; an all-reduce twice that.
WIRE_FACTOR = {"all-gather": 1, "reduce-scatter": 1, "all-reduce": 2, "all-to-all": 1, "broadcast": 1}


@dataclass
class Collective:
    role: str  # FSDP, HSDP, TP, Muon's gathers, grad norm / loss
    op: str
    group: str  # the mesh dimension it runs over
    group_size: int
    intra_node: bool
    calls: int = 0
    bytes: int = 0  # the whole tensor each call reduces or gathers
    wire_bytes: float = 0.0  # what each rank sends, ring algorithm


@dataclass
class Measurement:
    tracker: str  # which of torch's trackers counted
    peak: dict[str, int]  # bytes per category at the step's peak, and "total"
    state: dict[str, int]  # bytes of sharded parameters, gradients and optimizer state after the optimizer step
    flops: float  # FLOPs this GPU runs in the step (activation checkpointing's recomputation included)
    optimizer_flops: float = 0.0  # of which the optimizer step's (Muon's Newton-Schulz, shared out over the ranks)
    collectives: list[Collective] = field(default_factory=list)
    model_cfg: GPTConfig | None = None
    n_params: int = 0


def _sdpa_cpu_flops(query, key, *args, out_val=None, **kwargs) -> int:
    b, h, s_q, d = query.shape
    return 4 * b * h * s_q * key.shape[-2] * d  # QK^T and AV; under GQA each query head reads its kv head


def _sdpa_cpu_backward_flops(grad_out, query, key, *args, out_val=None, **kwargs) -> int:
    return 2 * _sdpa_cpu_flops(query, key)  # twice the forward, as for every matmul


# The fake world runs on the CPU, whose flash attention torch's FLOP table lacks: the same count as CUDA's.
FLOPS = {
    **flop_registry,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward_flops,
}


class StepCounter(TorchDispatchMode):
    """FLOPs and collectives of the local (per-rank) ops: DTensor ops are let through to be split into those."""

    def __init__(self, groups: dict[str, str], gpus_per_node: int):
        super().__init__()
        self.groups, self.gpus_per_node = groups, gpus_per_node
        self.flops = 0
        self.optimizer_flops = 0
        self.phase = "step"
        self.collectives: dict[tuple, Collective] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(t is DTensor for t in types):
            return NotImplemented
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        count = FLOPS.get(func._overloadpacket)
        if count is not None:
            flops = count(*args, **kwargs, out_val=out)
            self.flops += flops
            if self.phase == "optimizer":
                self.optimizer_flops += flops
        if func in COLLECTIVES:
            self._collective(func, args)
        return out

    def _collective(self, func, args) -> None:
        op, at = COLLECTIVES[func]
        boxed = next((a for a in args if isinstance(a, torch.ScriptObject)), None)
        if boxed is not None:  # c10d ops carry their process group boxed
            pg = dist.ProcessGroup.unbox(boxed)
        else:  # functional collectives name their group
            from torch.distributed.distributed_c10d import _resolve_process_group

            pg = _resolve_process_group(next(a for a in reversed(args) if isinstance(a, str)))
        inputs = args[at] if isinstance(args[at], (list, tuple)) else [args[at]]
        n = pg.size()
        payload = sum(t.numel() * t.element_size() for t in inputs) * (n if op == "all-gather" else 1)
        ranks = dist.get_process_group_ranks(pg)
        group = self.groups.get(pg.group_name, f"{n} ranks")
        key = (self._role(op, group), op, group)
        c = self.collectives.get(key)
        if c is None:
            c = self.collectives[key] = Collective(*key, n, len({r // self.gpus_per_node for r in ranks}) == 1)
        c.calls += 1
        c.bytes += payload
        c.wire_bytes += WIRE_FACTOR[op] * (n - 1) / n * payload

    def _role(self, op: str, group: str) -> str:
        if self.phase == "optimizer":
            return "Muon's gathers"
        if self.phase == "clip":
            return "grad norm"
        if group == "tp":
            return "TP"
        if group == "dp_replicate" and op == "all-reduce":
            return "HSDP"
        if group.startswith("dp") and op in ("all-gather", "reduce-scatter"):
            return "FSDP"
        return "loss"


def model_config(cfg) -> GPTConfig:
    """The job's model: section; a null vocab_size is the size of the tokenizer the job would train."""
    model_cfg = GPTConfig(**OmegaConf.to_container(cfg.model))
    if model_cfg.vocab_size is None:
        model_cfg.vocab_size = 64 * ((cfg.data.vocab_size + 63) // 64)
    return model_cfg


def _as_on_gpus(cfg, dist_info):
    """FSDP's param dtype and the autocast the trainer would use on GPUs (training/build.py `precision`), for
    fake tensors on the CPU."""
    with warnings.catch_warnings():  # a CUDA autocast on a machine without CUDA warns; it is not used
        warnings.simplefilter("ignore")
        param_dtype, gpu_autocast = precision(
            cfg, SimpleNamespace(device=torch.device("cuda"), dp_size=dist_info.dp_size)
        )
    autocast = nullcontext() if isinstance(gpu_autocast, nullcontext) else torch.autocast("cpu", dtype=torch.bfloat16)
    return param_dtype, autocast


def _tracker_for(model, optimizer):
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed._tools.mem_tracker import MemTracker
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):
        tracker = FSDPMemTracker(model, optimizer)
    else:
        tracker = MemTracker()
        tracker.track_external(model, optimizer)
    return tracker


def _by_name(snapshot: dict) -> dict[str, int]:
    (by_kind,) = snapshot.values()  # one device: the fake world's
    return {getattr(k, "value", str(k)): int(v) for k, v in by_kind.items()}


def measure_step(cfg, dist_info, gpus_per_node: int) -> Measurement:
    """The second training step of the job on rank 0 of dist_info's fake world."""
    model_cfg = model_config(cfg)
    param_dtype, autocast = _as_on_gpus(cfg, dist_info)
    mesh = dist_info.mesh
    groups = {}
    if mesh is not None:
        for name in ("dp_replicate", "dp_shard", "tp"):
            if mesh[name].size() > 1:
                groups[mesh[name].get_group().group_name] = name
    micro, seq = cfg.train.micro_batch_size, cfg.data.seq_len
    accum = min(cfg.train.grad_accum_steps, 2)  # a third micro-batch holds nothing the second didn't
    loss_context = vocab_parallel_loss if dist_info.tp > 1 else nullcontext
    # Built and spread over the mesh on the meta device, as training/build.py `build_model` does, but outside
    # FakeTensorMode: FSDP2 over a tensor-parallel mesh builds device meshes, whose rank tables must stay real.
    with torch.device("meta"):
        model = GPT(model_cfg)
    model = parallelize(
        model, mesh, param_dtype=param_dtype, activation_checkpointing=cfg.train.activation_checkpointing
    )
    with FakeTensorMode(allow_non_fake_inputs=True):  # the mesh's small rank tables are real tensors
        model.to_empty(device=dist_info.device)  # fake tensors: initial values don't change a step's memory
        optimizer = build_optimizer(model, cfg.optim, dist_info.device)
        x = torch.randint(0, model_cfg.vocab_size, (micro, seq))
        counter = StepCounter(groups, gpus_per_node)

        def step(tracker=None) -> dict[str, int]:
            counter.phase = "step"
            for i in range(accum):
                if hasattr(model, "set_requires_all_reduce"):  # as the trainer: HSDP's all-reduce once a step
                    model.set_requires_all_reduce(i == accum - 1)
                if i and tracker is not None and hasattr(tracker, "reset_mod_stats"):
                    tracker.reset_mod_stats()  # FSDPMemTracker follows one forward a module; the peak stays
                with loss_context():
                    with autocast:
                        if dist_info.tp > 1:
                            loss = token_cross_entropy(model(x), x, reduction="sum")
                        else:
                            loss = model(x, targets=x)
                    loss.backward()
            counter.phase = "clip"
            if cfg.optim.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip, foreach=True)
            counter.phase = "optimizer"
            optimizer.step()
            state = _by_name(tracker.get_tracker_snapshot("current")) if tracker is not None else {}
            optimizer.zero_grad(set_to_none=True)
            return state

        step()
        tracker = _tracker_for(model, optimizer)
        if hasattr(tracker, "track_inputs"):
            tracker.track_inputs((x,))
        with tracker, counter:
            state = step(tracker)
        peak = _by_name(tracker.get_tracker_snapshot("peak"))
    # the micro-batches' FLOPs scale with accumulation, the optimizer's don't
    flops = (counter.flops - counter.optimizer_flops) * cfg.train.grad_accum_steps / accum + counter.optimizer_flops
    collectives = list(counter.collectives.values())
    for c in collectives:  # the micro-batches not run cost what the last one did, but for the once-a-step ones
        if c.role in ("TP", "FSDP") and accum < cfg.train.grad_accum_steps:  # FSDP reduces every micro-batch
            scale = cfg.train.grad_accum_steps / accum
            c.calls, c.bytes, c.wire_bytes = int(c.calls * scale), int(c.bytes * scale), c.wire_bytes * scale
    return Measurement(
        type(tracker).__name__,
        peak,
        state,
        flops,
        counter.optimizer_flops,
        collectives,
        model_cfg,
        sum(p.numel() for p in model.parameters()) if mesh is None else _global_params(model),
    )


def _global_params(model) -> int:
    seen, n = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()  # a DTensor's numel is its global size
    return n
