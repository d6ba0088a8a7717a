"""Every job kind, by the name a job file gives in `kind:`, and the schema that checks it."""

from __future__ import annotations

from typing import Any

from jobspec.curate_schema import DataJobSpec
from jobspec.schema import ClassifyJobSpec, DPOJobSpec, EvalJobSpec, GRPOJobSpec, JobSpec, RMJobSpec, SFTJobSpec

KINDS: dict[str, Any] = {
    "pretrain": JobSpec,
    "sft": SFTJobSpec,
    "rm": RMJobSpec,
    "dpo": DPOJobSpec,
    "grpo": GRPOJobSpec,
    "classify": ClassifyJobSpec,
    "eval": EvalJobSpec,
    "data": DataJobSpec,
}
