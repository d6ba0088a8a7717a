"""Sequence classification: data (files and the demo task), baselines and metrics."""
