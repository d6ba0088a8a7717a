"""The job spec: one dataclass per YAML section, merged by OmegaConf.

Every key a user can write in a job YAML is a field below, with its default.
`grep -rn "cfg.train.max_steps"` (or any key) finds where it is consumed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

from model.config import GPTConfig


@dataclass
class DataConfig:
    # "demo" = the Python standard library's own source files on this machine
    # (held-out modules form the validation split); otherwise a list of local
    # .txt / .jsonl / .parquet files or folders.
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
    val_batches: int = 20  # micro-batches per validation pass (0 = the whole split)
    compile: bool = False  # torch.compile each block
    activation_checkpointing: bool = False
    dtype: str = "auto"  # auto = bf16 on GPU, fp32 on CPU; or fp32 / bf16
    device: str = "auto"  # auto = cuda when available, else cpu
    deterministic: bool = False  # torch.use_deterministic_algorithms (slower)
    time_budget_min: Optional[float] = None  # stop (and checkpoint) after this many minutes


@dataclass
class OptimConfig:
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 50
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
    async_save: bool = False
    init_from: Optional[str] = None  # a run folder, a checkpoint folder or a Hugging Face Llama folder


@dataclass
class ParallelConfig:
    dp_replicate: int = 1  # HSDP replicas (1 = plain FSDP)
    dp_shard: int = -1  # FSDP shards; -1 = whatever world size is left
    tp: int = 1  # tensor-parallel degree (consecutive ranks)


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


KINDS: dict[str, Any] = {"pretrain": JobSpec}
