"""The job contract, shared by the control plane (orchestrator/) and the data plane (training/).

    schema.py         every key a job YAML may hold, with its default (one dataclass per section)
    loading.py        YAML file + key=value overrides -> a checked config, or one SpecError paragraph
    pipeline_file.py  `kind: pipeline` files: stages, their order and their configs
    contract.py       what a run folder holds and what the trainer's exit codes mean

It imports neither plane (only model.config, the model's shape), and no torch: `orch` checks a job
without loading the data plane.
"""

from jobspec.loading import SpecError, load_spec, schema_keys
from jobspec.kinds import KINDS
from jobspec.schema import JobSpec

__all__ = ["SpecError", "load_spec", "schema_keys", "KINDS", "JobSpec"]
