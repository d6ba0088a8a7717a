"""The job spec: one dataclass per YAML section, merged by OmegaConf.

Every key a user can write in a job YAML is a field below, with its default.
`grep -rn "cfg.train.max_steps"` (or any key) finds where it is consumed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from model.config import GPTConfig


@dataclass
class DataConfig:
    # "demo" = the Python standard library's own source files on this machine
    # (held-out modules form the validation split); otherwise a list of local
    # .txt / .jsonl / .parquet files or folders. A folder with train/ and val/ subfolders (a data job's corpus/)
    # is read as already split.
    sources: List[str] = field(default_factory=lambda: ["demo"])
    text_field: str = "text"  # the column read from .jsonl / .parquet records
    tokenizer: Optional[str] = None  # a tokenizer.json to use; None = train a BPE one
    vocab_size: int = 4096  # size of the BPE vocabulary to train (special tokens included)
    seq_len: int = 256  # tokens per training sequence
    dir: str = "data/demo"  # where tokenizer.json, meta.json, train/ and val/ MDS shards go
    remote: Optional[str] = None  # optional remote (s3://, gs://, another folder) that dir caches
    val_fraction: float = 0.02  # share of documents held out when sources are not "demo"
    num_workers: int = 0  # DataLoader workers per rank
    shuffle: bool = True
    max_docs: Optional[int] = None  # cap the documents read (quick tests)


@dataclass
class TrainConfig:
    max_steps: int = 1000
    micro_batch_size: int = 16  # sequences per rank per micro-step
    grad_accum_steps: int = 1  # micro-steps per optimizer step
    log_every: int = 10
    val_every: int = 250  # 0 = only at the end
    val_at_start: bool = False  # also validate before the first step: the starting model's numbers, for comparison
    val_batches: int = 20  # micro-batches per validation pass (0 = the whole split)
    compile: bool = False  # torch.compile each block
    activation_checkpointing: bool = False
    dtype: str = "auto"  # auto = bf16 on GPU, fp32 on CPU; or fp32 / bf16
    device: str = "auto"  # auto = cuda when available, else cpu
    deterministic: bool = False  # torch.use_deterministic_algorithms (slower)
    time_budget_min: Optional[float] = None  # stop (and checkpoint) after this many minutes, counted across restarts
    max_nonfinite_steps: int = 5  # steps in a row with a NaN/inf loss or gradient that are skipped before the run stops


OPTIMIZERS = ("adamw", "muon")
SCHEDULES = ("cosine", "wsd")


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | muon (Muon on the blocks' matrices, AdamW on the rest: training/optim.py)
    lr: float = 3e-3  # AdamW's peak LR
    schedule: str = "cosine"  # cosine | wsd (warmup-stable-decay: constant, then a linear decay at the end)
    decay_fraction: float = 0.2  # wsd: the share of the steps spent decaying
    min_lr_ratio: float = 0.1  # the schedule ends at lr * min_lr_ratio
    warmup_steps: int = 50
    muon_lr: float = 0.02  # Muon's peak LR (its updates are orthogonalized: another scale than AdamW's)
    muon_momentum: float = 0.95
    muon_weight_decay: float = 0.0  # decoupled, times Muon's LR
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 = no clipping


@dataclass
class CheckpointConfig:
    every: int = 0  # save every N steps (0 = only at the end)
    keep_last: int = 2  # newest checkpoints kept
    keep_every: int = 0  # also keep every M-th step forever (0 = none)
    async_save: bool = False  # write in a background thread while training goes on: for GPU runs (docs/performance.md)
    init_from: Optional[str] = None  # a run folder, a checkpoint folder or a Hugging Face Llama folder


@dataclass
class ParallelConfig:
    dp_replicate: int = 1  # HSDP replicas (1 = plain FSDP)
    dp_shard: int = -1  # FSDP shards; -1 = whatever world size is left
    tp: int = 1  # tensor-parallel degree (consecutive ranks)
    collective_timeout_s: int = 600  # a rank silent this long (hung, its node lost) fails the others' collectives


@dataclass
class ResourcesConfig:
    """What a Slurm job asks for. Ignored by the local executor except nproc_per_node."""

    nodes: int = 1
    nproc_per_node: int = 1  # processes (tasks) per node: one per GPU, or CPU workers
    gpus_per_node: int = 0
    cpus_per_task: int = 1
    mem_gb: Optional[int] = None
    time_min: int = 60
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    sbatch_extra: List[str] = field(default_factory=list)  # raw flags, e.g. ["--exclusive"]
    max_requeues: int = 3  # preemptions / time-outs survived by requeueing
    max_retries: int = 1  # resubmissions after a failure


@dataclass
class JobSpec:
    kind: str = "pretrain"
    name: str = "pretrain"
    runs_dir: str = "runs"  # run folders go to runs_dir/<name>-<id>/
    seed: int = 1337
    executor: str = "auto"  # auto | local | slurm
    model: GPTConfig = field(default_factory=GPTConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)


@dataclass
class SFTConfig:
    """Supervised fine-tuning: JSON lines of {"prompt", "completion"} or {"messages": [{"role", "content"}...]},
    in the chat format of training/posttrain/chat.py; loss on the assistant's tokens only."""

    train_file: Optional[str] = None  # None = the demo pairs (a stdlib function from its signature and docstring)
    val_file: Optional[str] = None
    demo_dir: str = "data/posttrain"  # where the demo files are written when no files are given
    packing: bool = True  # several examples per row, attention kept within each; false = one per row, padded
    val_max: int = 0  # held-out examples evaluated (0 = all)


@dataclass
class LoRAConfig:
    """Low-rank adapters (model/lora.py): the base model is frozen and only the adapters (and
    modules_to_save) train; checkpoints hold those plus a reference to the base checkpoint."""

    enabled: bool = False
    rank: int = 16
    alpha: float = 32.0  # the update is scaled by alpha / rank
    dropout: float = 0.0  # on the adapters' input
    # our projection names (or longer suffixes such as layers.3.attention.wq); the default is every one
    target_modules: List[str] = field(default_factory=lambda: ["wq", "wk", "wv", "wo", "w1", "w2", "w3"])
    modules_to_save: List[str] = field(default_factory=list)  # whole modules trained and saved too, e.g. [norm]


@dataclass
class SFTJobSpec(JobSpec):
    kind: str = "sft"
    name: str = "sft"
    sft: SFTConfig = field(default_factory=SFTConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)


@dataclass
class PreferenceConfig:
    """Preference pairs for `rm` and `dpo`: JSON lines of {"prompt", "chosen", "rejected"}."""

    train_file: Optional[str] = None  # None = the demo pairs (a real stdlib function vs a corrupted one)
    val_file: Optional[str] = None
    demo_dir: str = "data/posttrain"  # where the demo files are written when no files are given
    val_max: int = 0  # held-out pairs evaluated (0 = all)


@dataclass
class DPOConfig(PreferenceConfig):
    beta: float = 0.1  # strength of the pull towards the reference model (higher = stay closer)


GRPO_LOSS_TYPES = ("grpo", "dr_grpo", "dapo")  # training/posttrain/losses.py: grpo_policy_loss
GRPO_SCALE_REWARDS = ("group", "batch", "none")  # training/posttrain/losses.py: group_advantages


@dataclass
class GRPOConfig:
    """Group-relative policy optimization over prompts: JSON lines of {"prompt", "signature"}."""

    train_file: Optional[str] = None  # None = the demo prompts (write a stdlib function from its signature)
    val_file: Optional[str] = None
    demo_dir: str = "data/posttrain"
    group_size: int = 4  # completions sampled per prompt; their rewards are normalized within the group
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: Optional[int] = None
    clip_eps: float = 0.2  # PPO-style ratio clip: ratio kept within [1 - clip_eps, 1 + epsilon_high] (TRL: epsilon)
    epsilon_high: Optional[float] = None  # the upper clip; None = clip_eps. DAPO recommends 0.28 (clip-higher)
    kl_coef: float = 0.04  # weight of the k3 KL penalty to the frozen reference (TRL: beta, default 0.0)
    num_iterations: int = 1  # policy updates per sampled batch (TRL's num_iterations, mu in DeepSeekMath)
    loss_type: str = "dapo"  # grpo | dr_grpo | dapo: how token losses are averaged (training/posttrain/losses.py)
    scale_rewards: str = "group"  # group | batch | none: what the centred rewards are divided by
    mask_truncated_completions: bool = False  # completions cut at max_new_tokens carry no loss (DAPO)
    # `module:function` called as fn(completion_text, record) -> float, or a trained `rm` run folder
    reward: str = "training.posttrain.rewards:python_parses"
    val_prompts: int = 64  # held-out prompts evaluated (0 = all)
    val_temperature: float = 0.0  # 0 = greedy completions at evaluation


@dataclass
class ClassifyConfig:
    """Sequence classification: JSON lines of {"text", "label"} (labels are strings)."""

    train_file: Optional[str] = None  # None = the demo task (is a stdlib function's body in its written order?)
    val_file: Optional[str] = None
    demo_dir: str = "data/classify"  # where the demo files are written when no files are given
    train_last_blocks: Optional[int] = None  # None = every block trains; N = only the last N (+ final norm, head)
    class_weights: str = "none"  # none | balanced (each class weighs n / (classes * its count) in the loss)
    baselines: bool = True  # also fit the majority class and TF-IDF + logistic regression, for comparison
    val_max: int = 0  # held-out examples evaluated (0 = all)


@dataclass
class RMJobSpec(JobSpec):
    kind: str = "rm"
    name: str = "rm"
    rm: PreferenceConfig = field(default_factory=PreferenceConfig)


@dataclass
class DPOJobSpec(JobSpec):
    kind: str = "dpo"
    name: str = "dpo"
    dpo: DPOConfig = field(default_factory=DPOConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)


@dataclass
class GRPOJobSpec(JobSpec):
    kind: str = "grpo"
    name: str = "grpo"
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)


@dataclass
class ClassifyJobSpec(JobSpec):
    kind: str = "classify"
    name: str = "classify"
    classify: ClassifyConfig = field(default_factory=ClassifyConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)


@dataclass
class EvalConfig:
    """What the eval job measures (training/evaluate/job.py): one model, or every stage of a pipeline."""

    source: Optional[str] = None  # a run, checkpoint or Hugging Face folder; None = checkpoint.init_from
    tasks: List[str] = field(default_factory=lambda: ["jobs/tasks/stdlib_continuation.yaml",
                                                      "jobs/tasks/python_functions.yaml",
                                                      "jobs/tasks/stdlib_bodies.yaml"])
    heldout: List[str] = field(default_factory=lambda: ["val"])  # splits of data.dir scored for perplexity and bpb
    max_examples: Optional[int] = None  # per task (None = all)
    # Stages to compare in report.md, each "STAGE=RUN_FOLDER" (or a bare folder: named after its kind),
    # e.g. ["pretrain=runs/pretrain-1a2b3c", "sft=runs/sft-4d5e6f"]; each is evaluated like the source.
    compare: List[str] = field(default_factory=list)
    report: bool = True  # write report.md and its PNG plots in the run folder


@dataclass
class EvalJobSpec(JobSpec):
    kind: str = "eval"
    name: str = "eval"
    eval: EvalConfig = field(default_factory=EvalConfig)


