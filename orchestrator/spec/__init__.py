"""Job specs: the schema (schema.py) and how YAML files and overrides become one (loading.py)."""

from orchestrator.spec.loading import SpecError, load_spec, schema_keys
from orchestrator.spec.schema import KINDS, JobSpec

__all__ = ["SpecError", "load_spec", "schema_keys", "KINDS", "JobSpec"]
