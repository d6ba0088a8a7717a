"""Evaluation: what a trained model can do.

    tasks.py     task YAML files in lm-evaluation-harness's layout (jobs/tasks/)
    scoring.py   perplexity and bits per byte, multiple choice by log-likelihood, generation with checkers
    job.py       the eval job (kind: eval): eval.json, and report.py's report.md with PNG plots

Models are loaded by training/run_folder.py; `orch generate|chat` live in training/tools/sample.py;
scripts/make_eval_tasks.py builds the shipped task data.
"""
