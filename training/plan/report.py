"""A plan as the user reads it (text) or a script does (JSON), and the one-paragraph refusal of a job that
doesn't fit."""

from __future__ import annotations

from training.plan.devices import GIB
from training.plan.estimate import MARGIN_BYTES, Plan

# FSDPMemTracker's and MemTracker's categories, grouped as the report shows them
GROUPS = {
    "parameters": ("Sharded Param", "Unsharded Param", "Parameter"),
    "gradients": ("Sharded Grad", "Unsharded Grad", "Gradient"),
    "optimizer state": ("OptState", "Optstate"),
    "activations": ("Activation",),
    "temporaries": ("Temp", "All Gather", "Reduce Scatter", "Inputs", "Other", "Buffer"),  # Buffer: rotary tables
}


def grouped(snapshot: dict[str, int]) -> dict[str, int]:
    return {name: sum(snapshot.get(k, 0) for k in keys) for name, keys in GROUPS.items()}


def gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if abs(n) >= GIB / 10 else f"{n / 2**20:.1f} MiB"


def as_dict(plan: Plan) -> dict:
    r = plan.roofline
    return {
        "job": plan.job,
        "layout": {
            "world": plan.layout.world,
            "gpus_per_node": plan.layout.gpus_per_node,
            "nodes": plan.layout.nodes,
            "dp_replicate": plan.layout.dp_replicate,
            "dp_shard": plan.layout.dp_shard,
            "tp": plan.layout.tp,
        },
        "device": {"name": plan.device.name, "memory_gib": plan.device.memory_gib},
        "tracker": plan.measured.tracker,
        "memory_gib": {
            "state": {k: v / GIB for k, v in grouped(plan.measured.state).items()},
            "at_peak": {k: v / GIB for k, v in grouped(plan.measured.peak).items()},
            "tensors_peak": plan.measured.peak["Total"] / GIB,
            "margin": MARGIN_BYTES / GIB,
            "peak": plan.peak_bytes / GIB,
            "headroom": plan.headroom_bytes / GIB,
        },
        "fits": plan.fits,
        "collectives": [
            {
                "role": c.role,
                "op": c.op,
                "group": c.group,
                "group_size": c.group_size,
                "intra_node": c.intra_node,
                "calls": c.calls,
                "bytes": c.bytes,
                "wire_bytes": c.wire_bytes,
            }
            for c in plan.measured.collectives
        ],
        "flops": {
            "measured_per_gpu": plan.measured.flops,
            "model_per_gpu": plan.model_flops,
            "optimizer_per_gpu": plan.measured.optimizer_flops,
        },
        "tokens_per_step": plan.tokens_per_step,
        "roofline": {
            "compute_s": r.compute_s,
            "memory_s": r.memory_s,
            "network_s": r.network_s,
            "step_s": r.step_s,
            "mfu": r.mfu,
        },
        "levers": [{**lever, "peak_gib": lever["peak_bytes"] / GIB} for lever in plan.levers],
    }


def render(plan: Plan) -> str:
    j, d, r = plan.job, plan.device, plan.roofline
    size = f"model.size={j['size']}, " if j["size"] else ""
    ac = ", activation checkpointing" if j["activation_checkpointing"] else ""
    lines = [
        (
            f"plan: {size}{j['params'] / 1e9:.2f}B parameters, seq {j['seq_len']} x micro-batch "
            f"{j['micro_batch_size']} x {j['grad_accum_steps']} accumulation{ac}, {j['optimizer']}"
        ),
        f"  layout: {plan.layout}; {plan.tokens_per_step:,} tokens a step",
        f"  device: {d.name} ({d.memory_gib:.1f} GiB for tensors)",
        f"memory per GPU ({plan.measured.tracker}, one training step on rank 0):",
    ]
    state, at_peak = grouped(plan.measured.state), grouped(plan.measured.peak)
    for name in GROUPS:
        lines.append(
            f"  {name:<16} {gib(state[name]):>12} after the optimizer step, {gib(at_peak[name]):>12} at the peak"
        )
    lines.append(
        f"  peak             {gib(plan.peak_bytes):>12} ({gib(plan.measured.peak['Total'])} of tensors + "
        f"{gib(MARGIN_BYTES)} for the CUDA context, NCCL and fragmentation)"
    )
    verdict = "fits" if plan.fits else "DOES NOT FIT"
    lines.append(f"  headroom         {gib(plan.headroom_bytes):>12} of {d.memory_gib:.1f} GiB: {verdict}")
    lines.append("collectives per step (each GPU; wire = what a ring sends):")
    for c in sorted(plan.measured.collectives, key=lambda c: -c.bytes):
        link = "NVLink" if c.intra_node else "network"
        lines.append(
            f"  {c.role:<15} {c.op:<15} over {c.group:<13} ({c.group_size:>3}, {link:<7}) {c.calls:>5} calls "
            f"{gib(c.bytes):>12}, wire {gib(c.wire_bytes)}"
        )
    if not plan.measured.collectives:
        lines.append("  none (one GPU)")
    lines += [
        (
            f"compute: {plan.measured.flops / 1e12:.1f} TFLOP a step per GPU ({plan.model_flops / 1e12:.1f} of them "
            "the model's, PaLM's accounting; the rest recomputation)"
        ),
        (
            f"optimizer: {plan.measured.optimizer_flops / 1e9:.1f} GFLOP a step per GPU (Muon's Newton-Schulz: each "
            "rank of a shard group orthogonalizes its share of the matrices)"
        ),
        (
            f"roofline on {d.name}: compute {r.compute_s * 1e3:.0f} ms, HBM {r.memory_s * 1e3:.0f} ms, collectives "
            f"{r.network_s * 1e3:.0f} ms -> step >= {r.step_s * 1e3:.0f} ms, MFU <= {r.mfu:.0%} "
            f"({plan.tokens_per_step / r.step_s:,.0f} tokens/s at most)"
        ),
    ]
    if not plan.fits:
        lines.append(refusal(plan))
    return "\n".join(lines)


def refusal(plan: Plan) -> str:
    """One paragraph: the peak, the device's memory, and the levers with their own peaks."""
    d = plan.device
    text = (
        f"The job needs {gib(plan.peak_bytes)} per GPU at its peak, more than the {d.memory_gib:.1f} GiB of {d.name}."
    )
    if plan.levers:
        options = "; ".join(
            f"{lever['lever']} ({' '.join(lever['overrides'])}): peak {gib(lever['peak_bytes'])}"
            + ("" if lever["peak_bytes"] <= d.memory_bytes else ", still too much")
            for lever in plan.levers
        )
        text += f" What would change it: {options}."
    return text
