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
class SFTJobSpec(JobSpec):
    kind: str = "sft"
    name: str = "sft"
    sft: SFTConfig = field(default_factory=SFTConfig)


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
    clip_eps: float = 0.2  # PPO-style ratio clip
    kl_coef: float = 0.04  # weight of the k3 KL penalty to the frozen reference (the starting model)
    # `module:function` called as fn(completion_text, record) -> float, or a trained `rm` run folder
    reward: str = "training.posttrain.rewards:python_parses"
    val_prompts: int = 64  # held-out prompts evaluated (0 = all)
    val_temperature: float = 0.0  # 0 = greedy completions at evaluation


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


@dataclass
class GRPOJobSpec(JobSpec):
    kind: str = "grpo"
    name: str = "grpo"
    grpo: GRPOConfig = field(default_factory=GRPOConfig)


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


# ------------------------------------------------------------------ data curation (training/data/curate/, docs/data.md)

@dataclass
class ReadingConfig:
    normalization: str = "NFC"  # Unicode normalization of every document: NFC, NFKC, NFD, NFKD or none
    suffixes: List[str] = field(default_factory=lambda: [".py", ".txt", ".jsonl", ".parquet"])  # files read in folders


@dataclass
class ExactDedupConfig:
    enabled: bool = True
    normalize_whitespace: bool = True  # hash after stripping line ends and collapsing blank lines and runs of spaces


@dataclass
class NearDedupConfig:
    enabled: bool = True
    threshold: float = 0.8  # estimated Jaccard similarity of n-gram sets at or above which documents are near copies
    num_perm: int = 128  # MinHash permutations (signature length)
    bands: int = 16  # LSH bands of num_perm / bands rows: the S-curve 1-(1-s^r)^b (docs/data.md)
    ngram: int = 5  # shingle length, in units
    unit: str = "word"  # word: runs of letters/digits/_ (lowercased); token: also each punctuation character
    seed: int = 1


@dataclass
class GopherQualityConfig:
    """Rae et al. 2021 (Gopher), appendix A: prose heuristics. They reject nearly all code (docs/data.md)."""

    enabled: bool = False
    min_words: int = 50
    max_words: int = 100_000
    min_mean_word_length: float = 3.0
    max_mean_word_length: float = 10.0
    max_symbol_word_ratio: float = 0.1  # '#' and '...' per word
    max_bullet_lines_ratio: float = 0.9
    max_ellipsis_lines_ratio: float = 0.3
    min_alpha_words_ratio: float = 0.8  # words with at least one letter
    min_stop_words: int = 2  # of: the, be, to, of, and, that, have, with


@dataclass
class GopherRepetitionConfig:
    """Gopher's repetition removal: duplicated lines, paragraphs and n-grams."""

    enabled: bool = False
    max_dup_line_fraction: float = 0.3
    max_dup_para_fraction: float = 0.3
    max_dup_line_char_fraction: float = 0.2
    max_dup_para_char_fraction: float = 0.2
    top_ngram_char_fractions: List[float] = field(default_factory=lambda: [0.20, 0.18, 0.16])  # n = 2, 3, 4
    dup_ngram_char_fractions: List[float] = field(default_factory=lambda: [0.15, 0.14, 0.13, 0.12, 0.11, 0.10])  # 5..10


@dataclass
class C4Config:
    """Raffel et al. 2020 (C4): drop lines without terminal punctuation or with few words, then whole-page rules."""

    enabled: bool = False
    min_words_per_line: int = 3
    min_sentences: int = 5
    max_word_length: int = 1000
    reject_lorem_ipsum: bool = True
    reject_curly_bracket: bool = True
    drop_javascript_lines: bool = True
    drop_policy_lines: bool = True


@dataclass
class FineWebConfig:
    """Penedo et al. 2024 (FineWeb): line-level statistics of a page."""

    enabled: bool = False
    min_line_punct_ratio: float = 0.12  # lines ending in terminal punctuation
    max_short_line_ratio: float = 0.67  # lines shorter than short_line_chars
    short_line_chars: int = 30
    max_dup_line_char_ratio: float = 0.01  # characters in duplicated lines
    max_newline_word_ratio: float = 0.3  # line breaks per word (lists)


@dataclass
class CodeFilterConfig:
    """The Stack / StarCoder file filters (Kocetkov et al. 2022, Li et al. 2023)."""

    enabled: bool = True
    max_line_length: int = 1000
    max_mean_line_length: float = 100.0
    min_alnum_fraction: float = 0.25
    autogenerated_lines: int = 5  # first lines searched for a marker; 0 = no auto-generated check
    autogenerated_markers: List[str] = field(default_factory=lambda: [
        "auto-generated", "autogenerated", "automatically generated", "generated automatically",
        "this file is generated", "generated by", "generated from", "do not edit"])
    max_data_fraction: float = 0.5  # share of characters in encoded data (base64, hex bytes, \\u escapes)
    max_data_chars: int = 1024


@dataclass
class QualityFiltersConfig:
    code: CodeFilterConfig = field(default_factory=CodeFilterConfig)
    gopher_quality: GopherQualityConfig = field(default_factory=GopherQualityConfig)
    gopher_repetition: GopherRepetitionConfig = field(default_factory=GopherRepetitionConfig)
    c4: C4Config = field(default_factory=C4Config)
    fineweb: FineWebConfig = field(default_factory=FineWebConfig)


@dataclass
class PIIConfig:
    enabled: bool = True
    emails: bool = True  # -> <EMAIL>
    ip_addresses: bool = True  # public (global) IPv4/IPv6 addresses -> <IP_ADDRESS>; private, loopback, ... stay
    secrets: bool = True  # API keys, tokens, private keys, high-entropy password assignments -> <KEY>


@dataclass
class DecontamConfig:
    enabled: bool = True
    ngram: int = 13  # words; a document sharing one such n-gram with the references is removed
    tasks: List[str] = field(default_factory=lambda: ["jobs/tasks/stdlib_continuation.yaml",
                                                      "jobs/tasks/python_functions.yaml",
                                                      "jobs/tasks/stdlib_bodies.yaml"])
    heldout: bool = True  # also the held-out (val) split of data.sources


@dataclass
class CurateConfig:
    """The data job's steps, in order; each can be switched off. The held-out split passes through untouched."""

    read: ReadingConfig = field(default_factory=ReadingConfig)
    exact_dedup: ExactDedupConfig = field(default_factory=ExactDedupConfig)
    near_dedup: NearDedupConfig = field(default_factory=NearDedupConfig)
    filters: QualityFiltersConfig = field(default_factory=QualityFiltersConfig)
    pii: PIIConfig = field(default_factory=PIIConfig)
    decontamination: DecontamConfig = field(default_factory=DecontamConfig)
    shards: int = 0  # input shards (tasks); 0 = about 4 per worker, at least one per 64 MiB
    workers: int = 0  # local processes; 0 = every core this process may use
    report_examples: int = 3  # removed documents shown per reason in report.md


@dataclass
class DataJobSpec(JobSpec):
    kind: str = "data"
    name: str = "data"
    curate: CurateConfig = field(default_factory=CurateConfig)


KINDS: dict[str, Any] = {"pretrain": JobSpec, "sft": SFTJobSpec, "rm": RMJobSpec, "dpo": DPOJobSpec, "grpo": GRPOJobSpec,
                         "eval": EvalJobSpec, "data": DataJobSpec}
