"""What `orch export --hf` adds for a classify run: LlamaForSequenceClassification's config keys."""

from __future__ import annotations

import json
from pathlib import Path


def classifier_config(run_dir: Path, num_labels: int) -> dict:
    """architectures, id2label and label2id from the run's labels.json (training/tasks/classify.py)."""
    path = Path(run_dir) / "labels.json"
    labels = json.loads(path.read_text()) if path.is_file() else [f"LABEL_{i}" for i in range(num_labels)]
    if len(labels) != num_labels:
        raise ValueError(f"{path} lists {len(labels)} labels but the checkpoint's head has {num_labels} rows")
    return {
        "architectures": ["LlamaForSequenceClassification"],
        "num_labels": num_labels,
        "id2label": {str(i): label for i, label in enumerate(labels)},
        "label2id": {label: i for i, label in enumerate(labels)},
        "problem_type": "single_label_classification",
    }
