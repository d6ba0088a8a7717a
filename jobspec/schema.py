"""The job spec: one dataclass per YAML section, merged by OmegaConf.

Every key a user can write in a job YAML is a field below, with its default.
`grep -rn "cfg.train.max_steps"` (or any key) finds where it is consumed.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Dict, Iterator, List, Optional, Union, get_args, get_origin, get_type_hints

from model.config import GPTConfig


@dataclass(frozen=True)
class Range:
    """The values a numeric key accepts (each entry, for a list of numbers); null passes where the key is Optional.
    ge/gt: the lower bound, inclusive/exclusive; le/lt: the upper one. jobspec/checks.py `check_ranges` reads them."""

    ge: Optional[float] = None
    gt: Optional[float] = None
    le: Optional[float] = None
    lt: Optional[float] = None
    why: str = ""  # said after the range in the error

    def __contains__(self, value) -> bool:
        return (
            (self.ge is None or value >= self.ge)
            and (self.gt is None or value > self.gt)
            and (self.le is None or value <= self.le)
            and (self.lt is None or value < self.lt)
        )

    def __str__(self) -> str:
        low = self.ge if self.ge is not None else self.gt
        high = self.le if self.le is not None else self.lt
        if high is None:
            if self.ge is not None:
                return "0 or more" if self.ge == 0 else f"at least {self.ge}"
            return "positive" if self.gt == 0 else f"more than {self.gt}"
        if low is None:
            return f"at most {self.le}" if self.lt is None else f"less than {self.lt}"
        return f"in {'[' if self.ge is not None else '('}{low}, {high}{']' if self.le is not None else ')'}"


def bounded(default, *, why: str = "", **bounds) -> Any:
    """A numeric field and its Range, e.g. `lr: float = bounded(3e-3, gt=0)`."""
    metadata = {"range": Range(why=why, **bounds)}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


# model: is GPTConfig, the model's own shape (model/config.py, a layer below that knows no job): its ranges live here.
MODEL_RANGES = {
    "vocab_size": Range(ge=1, why="null = the tokenizer's size"),
    "n_layer": Range(ge=1),
    "n_head": Range(ge=1),
    "n_kv_head": Range(ge=1, why="null = model.n_head"),
    "d_model": Range(ge=1),
    "ffn_hidden": Range(ge=1, why="null = sized from model.d_model"),
    "max_seq_len": Range(ge=1),
    "rope_theta": Range(gt=0),
    "norm_eps": Range(gt=0),
    "init_std": Range(gt=0),
    "logit_softcap": Range(gt=0, why="null = no cap"),
    "head_size": Range(ge=2, why="null = d_model / n_head"),
}


def numeric_keys(schema, prefix: str = "") -> Iterator[tuple[str, Optional[Range], bool]]:
    """(dotted key, its Range or None if it declares none, whether null is allowed) for every numeric key of a
    schema, lists of numbers included."""
    hints = get_type_hints(schema)
    for f in fields(schema):
        hint, key = hints[f.name], prefix + f.name
        if is_dataclass(hint):
            yield from numeric_keys(hint, key + ".")
            continue
        args = get_args(hint)
        nullable = get_origin(hint) is Union and type(None) in args
        base = next(a for a in args if a is not type(None)) if nullable else hint
        if get_origin(base) is list:
            base = get_args(base)[0]
        if base in (int, float):
            yield key, f.metadata.get("range") or (MODEL_RANGES.get(f.name) if schema is GPTConfig else None), nullable


@dataclass
class DataConfig:
    # "demo" = the Python standard library's own source files on this machine
    # (held-out modules form the validation split); otherwise a list of local
    # .txt / .jsonl / .parquet files or folders. A folder with train/ and val/ subfolders (a data job's corpus/)
    # is read as already split.
    sources: List[str] = field(default_factory=lambda: ["demo"])
    text_field: str = "text"  # the column read from .jsonl / .parquet records
    tokenizer: Optional[str] = None  # a tokenizer.json to use; None = train a BPE one
    # size of the BPE vocabulary to train (special tokens included)
    vocab_size: int = bounded(4096, ge=260, why="a byte-level BPE holds the 256 bytes and 4 special tokens")
    seq_len: int = bounded(256, ge=1)  # tokens per training sequence
    # where tokenizer.json, meta.json, train/ and val/ MDS shards go; null = a folder of this data config's own,
    # shared by every job with the same one: data/demo for the demo, else data/prepared/<fingerprint>
    # (jobspec/prepared_data.py)
    dir: Optional[str] = None
    remote: Optional[str] = None  # optional remote (s3://, gs://, another folder) that dir caches
    val_fraction: float = bounded(0.02, ge=0, lt=1)  # share of documents held out when sources are not "demo"
    num_workers: int = bounded(0, ge=0)  # DataLoader workers per rank
    shuffle: bool = True
    max_docs: Optional[int] = bounded(None, ge=1, why="null = every document")  # cap the documents read (quick tests)


@dataclass
class TrainConfig:
    max_steps: int = bounded(1000, ge=0, why="0 only validates and saves")
    micro_batch_size: int = bounded(16, ge=1)  # sequences per rank per micro-step
    grad_accum_steps: int = bounded(1, ge=1)  # micro-steps per optimizer step
    log_every: int = bounded(10, ge=1)
    val_every: int = bounded(250, ge=0)  # 0 = only at the end
    val_at_start: bool = False  # also validate before the first step: the starting model's numbers, for comparison
    val_batches: int = bounded(20, ge=0)  # micro-batches per validation pass (0 = the whole split)
    compile: bool = True  # torch.compile each block (eager, with a note, on a CPU without g++): docs/recipe.md
    activation_checkpointing: bool = False
    dtype: str = "auto"  # auto = bf16 on GPU, fp32 on CPU; or fp32 / bf16
    device: str = "auto"  # auto = cuda when available, else cpu
    deterministic: bool = False  # torch.use_deterministic_algorithms (slower)
    # stop (and checkpoint) after this many minutes, counted across restarts
    time_budget_min: Optional[float] = bounded(None, gt=0, why="null = no budget")
    # steps in a row with a NaN/inf loss or gradient that are skipped before the run stops
    max_nonfinite_steps: int = bounded(5, ge=1)


OPTIMIZERS = ("adamw", "muon")
SCHEDULES = ("cosine", "wsd")


@dataclass
class OptimConfig:
    # The pretraining recipe of docs/recipe.md: Muon at its measured LR with warmup-stable-decay (post-training
    # kinds start from finetune_optim below)
    name: str = "muon"  # adamw | muon (Muon on the blocks' matrices, AdamW on the rest: training/optim.py)
    lr: float = bounded(3e-3, gt=0)  # AdamW's peak LR (with muon: the embeddings' and gains')
    schedule: str = "wsd"  # cosine | wsd (warmup-stable-decay: constant, then a linear decay at the end)
    decay_fraction: float = bounded(0.2, gt=0, le=1)  # wsd: the share of the steps spent decaying
    min_lr_ratio: float = bounded(0.1, ge=0, le=1)  # the schedule ends at lr * min_lr_ratio
    warmup_steps: int = bounded(50, ge=0)
    muon_lr: float = bounded(0.01, gt=0)  # Muon's peak LR (orthogonalized updates: another scale than AdamW's)
    muon_momentum: float = bounded(0.95, ge=0, lt=1)
    muon_weight_decay: float = bounded(0.0, ge=0)  # decoupled, times Muon's LR
    weight_decay: float = bounded(0.1, ge=0)
    beta1: float = bounded(0.9, ge=0, lt=1)
    beta2: float = bounded(0.95, ge=0, lt=1)
    eps: float = bounded(1e-8, gt=0)
    grad_clip: float = bounded(1.0, ge=0, why="0 = no clipping")


@dataclass
class CheckpointConfig:
    every: int = bounded(0, ge=0)  # save every N steps (0 = only at the end)
    keep_last: int = bounded(
        2, ge=1, why="the newest checkpoint is what a resume starts from (checkpoint.keep_every keeps older ones too)"
    )  # newest checkpoints kept
    keep_every: int = bounded(0, ge=0)  # also keep every M-th step forever (0 = none)
    async_save: bool = False  # write in a background thread while training goes on: for GPU runs (docs/performance.md)
    init_from: Optional[str] = None  # a run folder, a checkpoint folder or a Hugging Face folder (docs/huggingface.md)


@dataclass
class ParallelConfig:
    dp_replicate: int = bounded(1, ge=1)  # HSDP replicas (1 = plain FSDP)
    # FSDP shards; -1 = whatever world size is left (not 0). With both left as they are on several nodes: one
    # node's GPUs (/ tp), replicated across the nodes (HSDP; training/distributed.py resolve_mesh_shape)
    dp_shard: int = bounded(-1, ge=-1, why="-1 = the rest")
    tp: int = bounded(1, ge=1)  # tensor-parallel degree (consecutive ranks)
    # a rank silent this long (hung, its node lost) fails the others' collectives
    collective_timeout_s: int = bounded(600, ge=1)


@dataclass
class ContainerConfig:
    """The image the job's srun tasks run in, as GPU Slurm sites run containers: NVIDIA's pyxis plugin with enroot
    (`srun --container-image=IMAGE --container-mounts=SRC:DST[:opts],...`). The batch script itself, its setup
    lines and the requeue decision after srun run on the node, outside the image."""

    image: Optional[str] = None  # e.g. nvcr.io#nvidia/pytorch:24.08-py3, or a squashfs file; null = no container
    # SRC:DST[:opts] each, e.g. /scratch/me:/scratch/me; the code, runs_dir and the data must be mounted in
    mounts: List[str] = field(default_factory=list)


@dataclass
class ResourcesConfig:
    """What a Slurm job asks for. The local executor reads nproc_per_node, env, python and the allowances; it
    refuses setup and container (docs/cluster.md)."""

    nodes: int = bounded(1, ge=1)
    nproc_per_node: int = bounded(1, ge=1)  # processes (tasks) per node: one per GPU, or CPU workers
    gpus_per_node: int = bounded(0, ge=0)
    cpus_per_task: int = bounded(1, ge=1)
    mem_gb: Optional[int] = bounded(None, ge=1, why="null = the partition's default")
    time_min: int = bounded(60, ge=1)
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    sbatch_extra: List[str] = field(default_factory=list)  # raw flags, e.g. ["--exclusive"]
    max_requeues: int = bounded(3, ge=0)  # preemptions / time-outs survived by requeueing
    max_retries: int = bounded(1, ge=0)  # resubmissions after a failure
    # Memory of one GPU; `orch submit --check-fit` refuses a job whose plan (`orch plan`) needs more. null = the
    # device `orch plan` assumes (an H100's 80 GB)
    gpu_mem_gib: Optional[float] = bounded(None, gt=0, why="null = an H100's")
    code: str = "snapshot"  # snapshot: run a copy of the code taken at submit (orchestrator/code_snapshot.py) | live
    # The environment on the nodes (orchestrator/executors/slurm.py renders it into the batch script): shell lines run
    # before srun, e.g. ["module load cuda/12.4", "source /shared/me/venv/bin/activate"], one command per line
    setup: List[str] = field(default_factory=list)
    env: Dict[str, str] = field(default_factory=dict)  # variables exported to every task, e.g. {NCCL_DEBUG: WARN}
    python: Optional[str] = None  # the interpreter on the nodes (a path, or a name on PATH after setup); null = orch's
    container: ContainerConfig = field(default_factory=ContainerConfig)


TRACKER_BACKENDS = ("jsonl", "tensorboard", "wandb", "mlflow")  # training/trackers.py writes each


@dataclass
class LoggingConfig:
    # Where a run's metrics go besides metrics.jsonl (always written): tensorboard = <run folder>/tensorboard,
    # wandb = <run folder>/wandb (offline unless WANDB_MODE=online), mlflow = MLFLOW_TRACKING_URI or <runs_dir>/mlruns
    backends: List[str] = field(default_factory=lambda: ["jsonl"])
    # The trackers' group (W&B group, MLflow parent run); a pipeline sets its id. null = none
    group: Optional[str] = None


@dataclass
class JobSpec:
    kind: str = "pretrain"
    name: str = "pretrain"
    runs_dir: str = "runs"  # run folders go to runs_dir/<name>-<id>/
    seed: int = bounded(1337, ge=0, le=2**32 - 1, why="numpy's and scikit-learn's seeds are 32-bit")
    executor: str = "auto"  # auto | local | slurm
    model: GPTConfig = field(default_factory=GPTConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


def finetune_optim() -> OptimConfig:
    """The post-training kinds' optimizer: AdamW with a cosine decay, the setting their job files were tuned with
    (Muon's measured LR is pretraining's: docs/recipe.md)."""
    return OptimConfig(name="adamw", schedule="cosine")


def finetune_train() -> TrainConfig:
    """The post-training kinds' loop: eager, since a fine-tune of a few hundred steps does not repay compiling."""
    return TrainConfig(compile=False)


@dataclass
class SFTConfig:
    """Supervised fine-tuning: JSON lines of {"prompt", "completion"} or {"messages": [{"role", "content"}...]},
    in the chat format of training/posttrain/chat.py; loss on the assistant's tokens only."""

    train_file: Optional[str] = None  # None = the demo pairs (a stdlib function from its signature and docstring)
    val_file: Optional[str] = None
    demo_dir: str = "data/posttrain"  # where the demo files are written when no files are given
    packing: bool = True  # several examples per row, attention kept within each; false = one per row, padded
    val_max: int = bounded(0, ge=0)  # held-out examples evaluated (0 = all)


@dataclass
class LoRAConfig:
    """Low-rank adapters (model/lora.py): the base model is frozen and only the adapters (and
    modules_to_save) train; checkpoints hold those plus a reference to the base checkpoint."""

    enabled: bool = False
    rank: int = bounded(16, ge=1)
    alpha: float = bounded(32.0, gt=0)  # the update is scaled by alpha / rank
    dropout: float = bounded(0.0, ge=0, lt=1)  # on the adapters' input
    # our projection names (or longer suffixes such as layers.3.attention.wq); the default is every one
    target_modules: List[str] = field(default_factory=lambda: ["wq", "wk", "wv", "wo", "w1", "w2", "w3"])
    modules_to_save: List[str] = field(default_factory=list)  # whole modules trained and saved too, e.g. [norm]
    use_rslora: bool = False  # scale by alpha / sqrt(rank) instead of alpha / rank (rsLoRA; PEFT's use_rslora)
    use_dora: bool = False  # weight-decomposed LoRA: a trained magnitude per output row (DoRA; PEFT's use_dora)


@dataclass
class SFTJobSpec(JobSpec):
    kind: str = "sft"
    name: str = "sft"
    train: TrainConfig = field(default_factory=finetune_train)
    optim: OptimConfig = field(default_factory=finetune_optim)
    sft: SFTConfig = field(default_factory=SFTConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)


@dataclass
class PreferenceConfig:
    """Preference pairs for `rm` and `dpo`: JSON lines of {"prompt", "chosen", "rejected"}."""

    train_file: Optional[str] = None  # None = the demo pairs (a real stdlib function vs a corrupted one)
    val_file: Optional[str] = None
    demo_dir: str = "data/posttrain"  # where the demo files are written when no files are given
    val_max: int = bounded(0, ge=0)  # held-out pairs evaluated (0 = all)


@dataclass
class DPOConfig(PreferenceConfig):
    beta: float = bounded(0.1, gt=0)  # strength of the pull towards the reference model (higher = stay closer)
    loss_type: str = "sigmoid"  # sigmoid | robust | hinge | ipo (training/posttrain/losses.py dpo_loss, TRL's names)
    # the share of labels assumed flipped (sigmoid, robust); 0.5 is refused by posttrain_checks.py (no information)
    label_smoothing: float = bounded(0.0, ge=0, le=0.5)
    reference_free: bool = False  # no reference model: its log-probs are taken as 0
    # weight of the chosen answers' NLL added to the loss (RPO); null = none
    rpo_alpha: Optional[float] = bounded(None, ge=0, why="null = no NLL term")
    # the reference's log-probs computed in one pass before training and kept in the run folder (no reference model
    # in memory while training)
    precompute_ref_log_probs: bool = False


DPO_LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo")  # training/posttrain/losses.py: dpo_loss
GRPO_LOSS_TYPES = ("grpo", "dr_grpo", "dapo")  # training/posttrain/losses.py: grpo_policy_loss
GRPO_SCALE_REWARDS = ("group", "batch", "none")  # training/posttrain/losses.py: group_advantages


@dataclass
class RewardTerm:
    """One of several GRPO rewards: `module:function` (or a function of training/posttrain/rewards.py by name)
    and its weight in the weighted sum."""

    fn: str = "demo_body_reward"
    weight: float = 1.0


@dataclass
class GRPOConfig:
    """Group-relative policy optimization over prompts: JSON lines of {"prompt", "signature"}."""

    train_file: Optional[str] = None  # None = the demo prompts (write a stdlib function from its signature)
    val_file: Optional[str] = None
    demo_dir: str = "data/posttrain"
    # completions sampled per prompt; their rewards are normalized within the group
    group_size: int = bounded(4, ge=2, why="a group needs at least 2 completions to compare")
    # the demo's: 9 in 10 demo functions are shorter (median 72 tokens), and a cut completion scores 0
    max_new_tokens: int = bounded(160, ge=1)
    temperature: float = bounded(1.0, gt=0, why="sampling is what explores")
    top_k: Optional[int] = bounded(None, ge=1, why="null = every token")
    # PPO-style ratio clip: ratio kept within [1 - clip_eps, 1 + epsilon_high] (TRL: epsilon)
    clip_eps: float = bounded(0.2, ge=0, lt=1)
    # the upper clip; None = clip_eps. DAPO recommends 0.28 (clip-higher)
    epsilon_high: Optional[float] = bounded(None, ge=0, why="null = grpo.clip_eps")
    kl_coef: float = bounded(0.04, ge=0)  # weight of the k3 KL penalty to the frozen reference (TRL: beta, default 0.0)
    # policy updates per sampled batch (TRL's num_iterations, mu in DeepSeekMath)
    num_iterations: int = bounded(1, ge=1)
    loss_type: str = "dapo"  # grpo | dr_grpo | dapo: how token losses are averaged (training/posttrain/losses.py)
    scale_rewards: str = "group"  # group | batch | none: what the centred rewards are divided by
    mask_truncated_completions: bool = False  # completions cut at max_new_tokens carry no loss (DAPO)
    # `module:function` called as fn(completion_text, record) -> float, or a trained `rm` run folder; the default
    # scores the demo's bodies (training/posttrain/rewards.py demo_body_reward)
    reward: str = "training.posttrain.rewards:demo_body_reward"
    # several rewards, summed with their weights, each called once per batch; when given, grpo.reward is not used
    rewards: List[RewardTerm] = field(default_factory=list, metadata={"entries": RewardTerm})
    stop_on_collapse: bool = True  # stop the run (exit 2) when its completions collapse (posttrain/collapse.py)
    val_prompts: int = bounded(64, ge=0)  # held-out prompts evaluated (0 = all)
    val_temperature: float = bounded(0.0, ge=0)  # 0 = greedy completions at evaluation


@dataclass
class ClassifyConfig:
    """Sequence classification: JSON lines of {"text", "label"} (labels are strings)."""

    train_file: Optional[str] = None  # None = the demo task (is a stdlib function's body in its written order?)
    val_file: Optional[str] = None
    demo_dir: str = "data/classify"  # where the demo files are written when no files are given
    # None = every block trains; N = only the last N (+ final norm, head)
    train_last_blocks: Optional[int] = bounded(None, ge=0, why="null = every block")
    class_weights: str = "none"  # none | balanced (each class weighs n / (classes * its count) in the loss)
    baselines: bool = True  # also fit the majority class and TF-IDF + logistic regression, for comparison
    val_max: int = bounded(0, ge=0)  # held-out examples evaluated (0 = all)


@dataclass
class RMJobSpec(JobSpec):
    kind: str = "rm"
    name: str = "rm"
    train: TrainConfig = field(default_factory=finetune_train)
    optim: OptimConfig = field(default_factory=finetune_optim)
    rm: PreferenceConfig = field(default_factory=PreferenceConfig)


@dataclass
class DPOJobSpec(JobSpec):
    kind: str = "dpo"
    name: str = "dpo"
    train: TrainConfig = field(default_factory=finetune_train)
    optim: OptimConfig = field(default_factory=finetune_optim)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)


@dataclass
class GRPOJobSpec(JobSpec):
    kind: str = "grpo"
    name: str = "grpo"
    train: TrainConfig = field(default_factory=finetune_train)
    optim: OptimConfig = field(default_factory=finetune_optim)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)


@dataclass
class ClassifyJobSpec(JobSpec):
    kind: str = "classify"
    name: str = "classify"
    train: TrainConfig = field(default_factory=finetune_train)
    optim: OptimConfig = field(default_factory=finetune_optim)
    classify: ClassifyConfig = field(default_factory=ClassifyConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)


@dataclass
class EvalConfig:
    """What the eval job measures (training/evaluate/job.py): one model, or every stage of a pipeline."""

    source: Optional[str] = None  # a run, checkpoint or Hugging Face folder; None = checkpoint.init_from
    tasks: List[str] = field(
        default_factory=lambda: [
            "jobs/tasks/stdlib_continuation.yaml",
            "jobs/tasks/python_functions.yaml",
            "jobs/tasks/stdlib_bodies.yaml",
        ]
    )
    heldout: List[str] = field(default_factory=lambda: ["val"])  # splits of data.dir scored for perplexity and bpb
    max_examples: Optional[int] = bounded(None, ge=1, why="null = all")  # per task
    # Stages to compare in report.md, each "STAGE=RUN_FOLDER" (or a bare folder: named after its kind),
    # e.g. ["pretrain=runs/pretrain-1a2b3c", "sft=runs/sft-4d5e6f"]; each is evaluated like the source.
    compare: List[str] = field(default_factory=list)
    report: bool = True  # write report.md and its PNG plots in the run folder


@dataclass
class EvalJobSpec(JobSpec):
    kind: str = "eval"
    name: str = "eval"
    train: TrainConfig = field(default_factory=finetune_train)
    optim: OptimConfig = field(default_factory=finetune_optim)
    eval: EvalConfig = field(default_factory=EvalConfig)
