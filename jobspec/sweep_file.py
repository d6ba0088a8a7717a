"""Sweep files (`kind: sweep`): one base pretrain job, trained at many sizes and token counts, for a scaling law.

    kind: sweep
    name: scaling
    job: pretrain.yaml            # the base job; every member is it with the overrides below and its own shape
    overrides: []                 # key=value applied to every member
    parallel: 2                   # members running at once (locally), the Slurm array's %P
    flops: 6ND                    # 6ND | 6ND+attention: how a budget C becomes tokens
    shape: {width_per_layer: 64, head_dim: 32}   # d_model = 64 n_layer, n_head = d_model / 32
    isoflop: {budgets: [1e13, 3e13], n_layer: [1, 2, 3, 4]}   # each budget at each depth: D from C
    # or grid: {n_layer: [1, 2, 4], tokens: [1e6, 4e6]}      # each depth at each token count: C from D
    warmup_fraction: 0.05         # each member warms up for this share of its steps
    fit_budgets: [1e15]           # the fit's compute-optimal N and D are given for these
    max_retries_per_member: 1     # a failed member runs again this often (its resources.max_retries)

The depth/width rule: a member of depth L has d_model = width_per_layer * L and n_head = d_model / head_dim
(the base job's n_kv_head, mlp and vocabulary kept). N counts the non-embedding parameters (Kaplan et al. 2020:
the embedding and output matrices are left out; at these sizes they would dominate N and bend the law).
A budget C buys D = C / (6N) tokens (flops: 6ND), or, counting attention's scores and weighted sums as well,
D = C / (6N + 6 n_layer seq_len d_model) (flops: 6ND+attention; Kaplan et al.'s forward term, x3 for the
backward). Steps = round(D / tokens per step), tokens per step = micro_batch_size x seq_len x grad_accum_steps
x nodes x nproc_per_node; warmup_steps = max(1, round(warmup_fraction x steps)); the base's schedule and peak
LRs are kept, and train.time_budget_min is cleared (a member must see exactly its tokens). The plan's keys
come last: an override of the shape, max_steps or warmup_steps (file or command line) is replaced by the plan's,
and so is resources.max_retries by max_retries_per_member when the file gives it (else the base job's counts).
This module reads and checks such a file and derives the members; nothing is registered or written.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig

from jobspec.checks import NAME
from jobspec.loading import SpecError, did_you_mean, load_spec, read_yaml
from model.config import GPTConfig

TOP_KEYS = (
    "kind",
    "name",
    "executor",
    "job",
    "overrides",
    "parallel",
    "flops",
    "shape",
    "isoflop",
    "grid",
    "warmup_fraction",
    "fit_budgets",
    "max_retries_per_member",
)
SHAPE_KEYS = ("width_per_layer", "head_dim")
FLOPS = ("6ND", "6ND+attention")


@dataclass
class Member:
    name: str  # the run id's suffix: b<budget index>-L<depth> (isoflop) or t<tokens index>-L<depth> (grid)
    n_layer: int
    d_model: int
    n_head: int
    N: int  # non-embedding parameters
    D: int  # tokens it trains on: steps x tokens per step
    C: float  # the budget it belongs to (isoflop: as planned; grid: its own FLOPs)
    steps: int
    warmup_steps: int
    overrides: list[str] = field(default_factory=list)  # every override, in the order applied
    cfg: DictConfig | None = None


@dataclass
class Sweep:
    path: str
    name: str
    executor: str
    job: str
    parallel: int
    flops: str
    members: list[Member]
    fit_budgets: list[float]
    plan_key: str = "isoflop"  # isoflop | grid: the key whose lists make the members


def non_embedding_params(cfg: GPTConfig) -> int:
    """Parameters outside the token embedding and the output head: the blocks and the final norm."""
    d, hd = cfg.d_model, cfg.head_dim
    attention = d * cfg.n_head * hd + 2 * d * cfg.kv_heads * hd + cfg.n_head * hd * d
    mlp = (3 if cfg.mlp == "swiglu" else 2) * d * cfg.hidden_dim
    return cfg.n_layer * (attention + mlp + 2 * d) + d


def flops_per_token(cfg: GPTConfig, seq_len: int, rule: str) -> float:
    """Training FLOPs per token: 6N, plus attention's 6 n_layer seq_len d_model under 6ND+attention."""
    attention = 6.0 * cfg.n_layer * seq_len * cfg.d_model if rule == "6ND+attention" else 0.0
    return 6.0 * non_embedding_params(cfg) + attention


def is_sweep_file(path: str) -> bool:
    """True when the YAML file says `kind: sweep` (anything unreadable is left to load_spec to explain)."""
    try:
        return read_yaml(path).get("kind") == "sweep"
    except SpecError:
        return False


def _numbers(raw: dict, key: str, where: str, integer: bool = False) -> list:
    value = raw.get(key.rsplit(".", 1)[-1])
    ok = (
        isinstance(value, list)
        and value
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0 for v in value)
    )
    if ok and integer:
        ok = all(float(v).is_integer() for v in value)
    if not ok:
        kind = "positive whole numbers, e.g. [1, 2, 4]" if integer else "positive numbers, e.g. [1e13, 3e13]"
        raise SpecError(f"{where}: key '{key}' has the value {value!r}, but it must be a list of {kind}.")
    return [int(v) if integer else float(v) for v in value]


def _check_keys(raw: dict, allowed: Sequence[str], where, prefix: str = "") -> None:
    for key, value in raw.items():
        if key not in allowed:
            raise SpecError(
                f"{where(prefix + str(key))}: unknown key '{prefix}{key}' (value {value!r})."
                f"{did_you_mean(str(key), allowed)} Valid keys: {', '.join(allowed)}."
            )


def load_sweep(
    path: str, overrides: Sequence[str] = (), check_count: Callable[[str, str, int], None] | None = None
) -> Sweep:
    """Read and check a sweep file, derive every member and check its job; nothing is registered or written.
    check_count(executor, plan key, members), when given, may refuse the number of members (SpecError) before
    each member's job is checked (a Slurm job array's MaxArraySize: the caller knows the cluster)."""
    lines: dict[str, int] = {}
    raw = read_yaml(path, lines)

    def where(key):
        return f"{path}, line {lines[key]}" if key in lines else path

    _check_keys(raw, TOP_KEYS, where)
    if raw.get("kind") != "sweep":
        raise SpecError(f"{path}: key 'kind' has the value {raw.get('kind')!r}, but a sweep file says kind: sweep.")
    name = raw.get("name") or Path(path).stem
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise SpecError(
            f"{where('name')}: key 'name' has the value {name!r}, but it must be letters, digits, '_', '.' or '-'."
        )
    executor = raw.get("executor", "auto")
    if executor not in ("auto", "local", "slurm"):
        raise SpecError(
            f"{where('executor')}: key 'executor' has the value {executor!r}, but it must be one of auto, local, slurm."
        )
    file_overrides = raw.get("overrides") or []
    if not isinstance(file_overrides, list) or not all(isinstance(v, str) and "=" in v for v in file_overrides):
        raise SpecError(
            f"{where('overrides')}: key 'overrides' has the value {file_overrides!r}, but it must be "
            "a list of key=value strings, e.g. [\"train.compile=false\"]."
        )
    parallel = raw.get("parallel", 1)
    if not isinstance(parallel, int) or isinstance(parallel, bool) or parallel < 1:
        raise SpecError(
            f"{where('parallel')}: key 'parallel' has the value {parallel!r}, but it must be a whole "
            "number of members to run at once, at least 1."
        )
    flops = raw.get("flops", "6ND")
    if flops not in FLOPS:
        raise SpecError(
            f"{where('flops')}: key 'flops' has the value {flops!r}, but it must be one of {', '.join(FLOPS)}."
        )
    warmup_fraction = raw.get("warmup_fraction", 0.05)
    if not isinstance(warmup_fraction, (int, float)) or not 0 <= warmup_fraction < 1:
        raise SpecError(
            f"{where('warmup_fraction')}: key 'warmup_fraction' has the value {warmup_fraction!r}, "
            "but it must be a share of each member's steps, from 0 up to (not including) 1."
        )
    shape = raw.get("shape")
    if not isinstance(shape, dict) or set(shape) != set(SHAPE_KEYS):
        raise SpecError(
            f"{where('shape')}: key 'shape' has the value {shape!r}, but it must state the depth/width "
            "rule as {width_per_layer: W, head_dim: H}: d_model = W x n_layer, n_head = d_model / H."
        )
    for key in SHAPE_KEYS:
        if not isinstance(shape[key], int) or isinstance(shape[key], bool) or shape[key] < 1:
            raise SpecError(
                f"{where('shape.' + key)}: key 'shape.{key}' has the value {shape[key]!r}, but it must "
                "be a positive whole number."
            )
    if ("isoflop" in raw) == ("grid" in raw):
        raise SpecError(
            f"{path}: a sweep has exactly one plan: 'isoflop' ({{budgets: [C...], n_layer: [...]}}) "
            "or 'grid' ({n_layer: [...], tokens: [D...]}); it has " + ("both." if "isoflop" in raw else "neither.")
        )
    plan_key = "isoflop" if "isoflop" in raw else "grid"
    plan = raw[plan_key]
    if not isinstance(plan, dict):
        raise SpecError(f"{where(plan_key)}: key '{plan_key}' has the value {plan!r}, but it must be a mapping.")
    _check_keys(plan, ("budgets", "n_layer") if plan_key == "isoflop" else ("tokens", "n_layer"), where, plan_key + ".")
    depths = _numbers(plan, f"{plan_key}.n_layer", where(f"{plan_key}.n_layer"), integer=True)
    amounts = _numbers(
        plan,
        f"{plan_key}.{'budgets' if plan_key == 'isoflop' else 'tokens'}",
        where(f"{plan_key}.{'budgets' if plan_key == 'isoflop' else 'tokens'}"),
    )
    fit_budgets = _numbers(raw, "fit_budgets", where("fit_budgets")) if "fit_budgets" in raw else []
    retries = raw.get("max_retries_per_member")
    if retries is not None and (not isinstance(retries, int) or isinstance(retries, bool) or retries < 0):
        raise SpecError(
            f"{where('max_retries_per_member')}: key 'max_retries_per_member' has the value {retries!r}, but it "
            "must be a whole number of times a failed member runs again, 0 or more."
        )
    job = _find_job(raw.get("job"), path, where("job"))
    base = load_spec(job, [*file_overrides, *overrides], launch=True)
    if base.kind != "pretrain":
        raise SpecError(
            f"{where('job')}: key 'job' names {job}, a {base.kind} job, but a sweep's members "
            "pretrain: give a kind: pretrain job."
        )
    tokens_per_step = (
        base.train.micro_batch_size
        * base.data.seq_len
        * base.train.grad_accum_steps
        * base.resources.nodes
        * base.resources.nproc_per_node
    )

    members = []
    for depth in depths:
        model = _shape(depth, shape, base.model, where, f"{plan_key}.n_layer")
        d_model, n_head = model.d_model, model.n_head
        N, per_token = non_embedding_params(model), flops_per_token(model, base.data.seq_len, flops)
        for i, amount in enumerate(amounts):
            C, D = (amount, amount / per_token) if plan_key == "isoflop" else (amount * per_token, amount)
            steps = round(D / tokens_per_step)
            if steps < 1:
                key = f"{plan_key}.{'budgets' if plan_key == 'isoflop' else 'tokens'}"
                what = f"budget {amount:g} FLOPs" if plan_key == "isoflop" else f"{amount:g} tokens"
                raise SpecError(
                    f"{where(key)}: key '{key}' has the value {amount:g}: {what} "
                    f"gives the {depth}-layer member (N = {N:,} parameters, {per_token:,.0f} FLOPs a "
                    f"token) {D:,.0f} tokens, less than one step's {tokens_per_step:,} (micro_batch_size "
                    "x seq_len x grad_accum_steps x nodes x nproc_per_node). Raise it or shrink the step."
                )
            label = f"{'b' if plan_key == 'isoflop' else 't'}{i}-L{depth}"
            member_overrides = [
                *file_overrides,
                *overrides,
                f"name={name}-{label}",
                f"model.n_layer={depth}",
                f"model.d_model={d_model}",
                f"model.n_head={n_head}",
                f"train.max_steps={steps}",
                f"optim.warmup_steps={max(1, round(warmup_fraction * steps))}",
                "train.time_budget_min=null",
                *([f"resources.max_retries={retries}"] if retries is not None else []),
            ]
            members.append(
                Member(
                    label,
                    depth,
                    d_model,
                    n_head,
                    N,
                    steps * tokens_per_step,
                    float(C),
                    steps,
                    max(1, round(warmup_fraction * steps)),
                    member_overrides,
                )
            )
    if check_count is not None:
        check_count(executor, plan_key, len(members))
    for m in members:
        try:
            m.cfg = load_spec(job, m.overrides, launch=True)
        except SpecError as e:
            raise SpecError(f"{path}, member {m.name}: {e}") from None
    return Sweep(path, name, executor, job, parallel, flops, members, fit_budgets, plan_key)


def _shape(depth: int, shape: dict, base_model, where, key: str) -> GPTConfig:
    """The depth/width rule's model at this depth, or SpecError when the GPT would refuse it."""
    d_model = shape["width_per_layer"] * depth
    if d_model % shape["head_dim"]:
        raise SpecError(
            f"{where(key)}: key '{key}' has the value {depth}, which gives d_model = "
            f"{shape['width_per_layer']} x {depth} = {d_model}, not divisible by shape.head_dim="
            f"{shape['head_dim']}: the heads would not divide the width. Choose depths (or a "
            "width_per_layer) whose width is a multiple of head_dim."
        )
    n_head = d_model // shape["head_dim"]
    model = GPTConfig(
        vocab_size=base_model.vocab_size or 1,
        n_layer=depth,
        n_head=n_head,
        d_model=d_model,
        n_kv_head=base_model.n_kv_head,
        ffn_hidden=base_model.ffn_hidden,
        mlp=base_model.mlp,
    )
    try:
        model.validate()
    except ValueError as e:
        raise SpecError(
            f"{where(key)}: key '{key}' has the value {depth}, which gives a model (n_layer={depth}, "
            f"d_model={d_model}, n_head={n_head}) the GPT refuses: {e}."
        ) from None
    return model


def _find_job(job, path: str, where: str) -> str:
    if not isinstance(job, str):
        raise SpecError(
            f"{where}: key 'job' has the value {job!r}, but a sweep needs its base pretrain job (job: pretrain.yaml)."
        )
    for base in (Path(path).resolve().parent, Path.cwd()):
        if (base / job).is_file():
            return str(base / job)
    raise SpecError(
        f"{where}: key 'job' has the value {job!r}, but no such job file exists (looked in "
        f"{Path(path).resolve().parent} and {Path.cwd()})."
    )
