"""A job's plan: its measured step (measure.py) in the fake world (world.py), on a device of devices.py, turned
into what a user decides with: the peak against the GPU's memory, the collectives' bytes, a roofline step time,
and when it doesn't fit, the levers that would make it fit."""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import OmegaConf

from model.gpt import flops_per_token
from training.plan.devices import Device
from training.plan.measure import Measurement, measure_step
from training.plan.world import fake_world

# What a GPU holds beyond the tensors the tracker counts: the CUDA context, NCCL's buffers, the caching allocator's
# fragmentation (bench/memory_plan.py says 1-3 GiB; the middle of it).
MARGIN_BYTES = 2 * 2**30


@dataclass
class Layout:
    world: int
    gpus_per_node: int
    dp_replicate: int
    dp_shard: int
    tp: int

    @property
    def nodes(self) -> int:
        return max(1, self.world // self.gpus_per_node)

    def __str__(self) -> str:
        hsdp = f"{self.dp_replicate} x " if self.dp_replicate > 1 else ""
        per_node = min(self.world, self.gpus_per_node)
        return f"{self.world} GPUs ({self.nodes} x {per_node}): dp {hsdp}{self.dp_shard} x tp {self.tp}"


@dataclass
class Roofline:
    compute_s: float  # the step's FLOPs at the device's peak
    memory_s: float  # the step's HBM traffic (an estimate: below) at the device's bandwidth
    network_s: float  # the collectives' wire bytes at NVLink's or the network's bandwidth
    step_s: float  # the largest of the three: each overlapped perfectly with the others
    mfu: float  # model FLOPs / (step_s x peak): an upper bound; real runs reach about half of it


@dataclass
class Plan:
    job: dict  # the keys that shaped the plan: model size, seq, micro-batch, accumulation, checkpointing, optimizer
    layout: Layout
    device: Device
    measured: Measurement
    tokens_per_step: int  # all ranks
    model_flops: float  # per GPU per step, PaLM's accounting (model/gpt.py flops_per_token): no recomputation
    roofline: Roofline
    levers: list[dict] = field(default_factory=list)  # when it doesn't fit: {"lever", "overrides", "peak_bytes"}

    @property
    def peak_bytes(self) -> int:
        return self.measured.peak["Total"] + MARGIN_BYTES

    @property
    def headroom_bytes(self) -> float:
        return self.device.memory_bytes - self.peak_bytes

    @property
    def fits(self) -> bool:
        return self.headroom_bytes >= 0


def plan_job(cfg, world: int, gpus_per_node: int, device: Device, levers: bool = True) -> Plan:
    """The plan of a loaded job (jobspec.load_spec, launch checks passed) at `world` GPUs."""
    with fake_world(world, cfg.parallel, gpus_per_node) as dist_info:
        measured = measure_step(cfg, dist_info, gpus_per_node)
    layout = Layout(world, gpus_per_node, dist_info.dp_replicate, dist_info.dp_shard, dist_info.tp)
    t = cfg.train
    tokens_per_rank = t.micro_batch_size * cfg.data.seq_len * t.grad_accum_steps
    model_flops = flops_per_token(measured.model_cfg, cfg.data.seq_len) * tokens_per_rank / layout.tp
    job = {
        "size": cfg.model.size,
        "params": measured.n_params,
        "seq_len": cfg.data.seq_len,
        "micro_batch_size": t.micro_batch_size,
        "grad_accum_steps": t.grad_accum_steps,
        "activation_checkpointing": t.activation_checkpointing,
        "optimizer": cfg.optim.name,
    }
    plan = Plan(
        job,
        layout,
        device,
        measured,
        tokens_per_rank * layout.dp_replicate * layout.dp_shard,
        model_flops,
        _roofline(measured, layout, device, model_flops),
    )
    if levers and not plan.fits:
        plan.levers = find_levers(cfg, plan)
    return plan


def _roofline(m: Measurement, layout: Layout, device: Device, model_flops: float) -> Roofline:
    compute = m.flops / device.bf16_flops
    # HBM traffic, a floor: the bf16 weights read in forward and twice in backward, the optimizer reading and
    # writing the sharded fp32 weights, gradients and states, and each saved activation written once, read once.
    params_per_gpu = m.n_params / layout.tp
    sharded = m.state.get("Sharded Param", 0) + m.state.get("Sharded Grad", 0) + m.state.get("OptState", 0)
    hbm = 3 * 2 * params_per_gpu + 2 * sharded + 2 * m.peak.get("Activation", 0)
    memory = hbm / device.hbm_bytes_s
    network = sum(
        c.wire_bytes / (device.nvlink_bytes_s if c.intra_node else device.network_bytes_s) for c in m.collectives
    )
    step = max(compute, memory, network)
    return Roofline(compute, memory, network, step, model_flops / (step * device.bf16_flops) if step else 0.0)


def find_levers(cfg, plan: Plan) -> list[dict]:
    """The first two of activation checkpointing, twice the tensor parallelism, half the micro-batch (in that order,
    and together when none fits alone) that bring the peak under the device's memory, each with its own peak."""
    t, p = cfg.train, cfg.parallel
    n_head, n_kv = plan.measured.model_cfg.n_head, plan.measured.model_cfg.kv_heads
    candidates = []
    if not t.activation_checkpointing:
        candidates.append(("activation checkpointing", ["train.activation_checkpointing=true"]))
    tp = p.tp * 2
    if (
        plan.layout.gpus_per_node % tp == 0
        and n_head % tp == 0
        and n_kv % tp == 0
        and plan.layout.world % (p.dp_replicate * tp) == 0
    ):
        shard = ["parallel.dp_shard=-1"] if p.dp_shard != -1 else []
        candidates.append((f"tensor parallel over {tp} GPUs", [f"parallel.tp={tp}", *shard]))
    if t.micro_batch_size > 1:
        half = t.micro_batch_size // 2
        accum = t.grad_accum_steps * 2
        candidates.append(
            (
                f"micro-batch {half} (x{accum} accumulation: the same tokens a step)",
                [f"train.micro_batch_size={half}", f"train.grad_accum_steps={accum}"],
            )
        )
    found, tried = [], []
    for lever, overrides in candidates + _combined(candidates):
        if len(found) == 2:
            break
        peak = _peak_with(cfg, overrides, plan)
        tried.append({"lever": lever, "overrides": overrides, "peak_bytes": peak})
        if peak <= plan.device.memory_bytes:
            found.append(tried[-1])
    return found or tried[:2]


def _combined(candidates: list) -> list:
    if len(candidates) < 2:
        return []
    return [(" + ".join(c[0] for c in candidates), [o for c in candidates for o in c[1]])]


def _peak_with(cfg, overrides: list[str], plan: Plan) -> int:
    changed = OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))
    other = plan_job(changed, plan.layout.world, plan.layout.gpus_per_node, plan.device, levers=False)
    return other.peak_bytes
