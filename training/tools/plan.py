"""`orch plan JOB [k=v ...]`: the job's training step in a fake world of its real size, on this CPU, before it
queues (training/plan/); and the fit check behind `orch submit --check-fit`. Its arguments:
training/tools/__init__.py."""

from __future__ import annotations

import json


def layout_overrides(args) -> list[str]:
    """--world / --nodes / --gpus-per-node as the resources.* overrides they mean, so that the job is checked by
    the same launch checks as at submit (a mesh that doesn't divide the world fails with the same words)."""
    if args.world is not None and args.nodes is not None:
        raise ValueError("give --world or --nodes (with --gpus-per-node), not both")
    if args.world is not None:
        per_node = args.gpus_per_node or min(args.world, 8)
        if args.world % per_node:
            raise ValueError(
                f"--world {args.world} is not a whole number of nodes of {per_node} GPUs (--gpus-per-node)"
            )
        return [f"resources.nodes={args.world // per_node}", f"resources.nproc_per_node={per_node}"]
    out = [f"resources.nodes={args.nodes}"] if args.nodes is not None else []
    if args.gpus_per_node is not None:
        out.append(f"resources.nproc_per_node={args.gpus_per_node}")
    return out


def plan_for(cfg, device_name: str | None = None, levers: bool = True):
    """The plan of a loaded job on the GPUs its resources: section asks for."""
    from training.plan.devices import device_for
    from training.plan.estimate import plan_job

    r = cfg.resources
    device = device_for(device_name, r.gpu_mem_gib)
    return plan_job(cfg, r.nodes * r.nproc_per_node, r.nproc_per_node, device, levers=levers)


def cmd_plan(args) -> int:
    from jobspec import load_spec
    from training.plan.report import as_dict, render

    cfg = load_spec(args.config, [*args.overrides, *layout_overrides(args)], launch=True)
    plan = plan_for(cfg, args.device)
    print(json.dumps(as_dict(plan), indent=1) if args.json else render(plan))
    return 0 if plan.fits else 2


def check_fit(cfg, path: str) -> None:
    """`orch submit --check-fit`: a SpecError (exit 2, nothing queued) when the job's plan exceeds its GPUs."""
    from jobspec import SpecError
    from training.plan.report import refusal

    plan = plan_for(cfg)
    if not plan.fits:
        raise SpecError(
            f"{path}: resources.nodes={cfg.resources.nodes} x resources.nproc_per_node="
            f"{cfg.resources.nproc_per_node} ({plan.layout}): "
            + refusal(plan)
            + f" `orch plan {path}` shows the whole plan."
        )
    print(f"fits: {plan.peak_bytes / 2**30:.1f} GiB of {plan.device.memory_gib:.1f} GiB per GPU at the peak")
