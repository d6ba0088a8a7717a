"""What `orch export --hf` adds for a classify run (LlamaForSequenceClassification's config keys, a tokenizer that
appends the end-of-sequence token as training did) and for a reward model (the same class with one label)."""

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


def reward_model_config() -> dict:
    """A reward model as transformers (and TRL's RewardTrainer) hold one: a sequence classifier with one label,
    whose logit is the reward read at the last token that is not padding."""
    return {
        "architectures": ["LlamaForSequenceClassification"],
        "num_labels": 1,
        "id2label": {"0": "LABEL_0"},
        "label2id": {"LABEL_0": 0},
    }


def append_eos(tokenizer_json: Path, eos_id: int) -> None:
    """Make an exported tokenizer.json append the end-of-sequence token when it encodes with special tokens (what
    transformers' pipeline does), as training/classify/data.py appended it: the head then reads the same position."""
    from tokenizers import Tokenizer, processors

    tok = Tokenizer.from_file(str(tokenizer_json))
    eos = tok.id_to_token(eos_id)
    template = processors.TemplateProcessing(
        single=f"$A {eos}", pair=f"$A {eos} $B:1 {eos}:1", special_tokens=[(eos, eos_id)]
    )
    tok.post_processor = processors.Sequence([tok.post_processor, template]) if tok.post_processor else template
    tok.save(str(tokenizer_json))
