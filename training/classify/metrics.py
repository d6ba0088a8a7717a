"""Classification metrics from a confusion matrix, the two baselines (scikit-learn), and the report.

confusion[i][j] = examples of true class i predicted as class j
macro-F1 = the mean over classes of 2 * precision * recall / (precision + recall) (0 for a class never
predicted nor present), as sklearn.metrics.f1_score(average="macro") computes it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


def scores(confusion: torch.Tensor) -> dict[str, float]:
    """accuracy and macro-F1 of a [classes, classes] confusion matrix."""
    c = confusion.double()
    tp = c.diag()
    precision = tp / c.sum(0).clamp(min=1e-12)
    recall = tp / c.sum(1).clamp(min=1e-12)
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall), torch.zeros_like(tp))
    return {"accuracy": (tp.sum() / c.sum().clamp(min=1e-12)).item(), "macro_f1": f1.mean().item()}


def baselines(train: list[dict], val: list[dict], labels: list[str], seed: int) -> dict[str, dict]:
    """Held-out accuracy and macro-F1 of the majority class and of TF-IDF + logistic regression."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score

    y_train = [r["label"] for r in train]
    y_val = [r["label"] for r in val]
    majority = max(labels, key=y_train.count)
    # Code tokens: identifiers, numbers and operators as words; unigrams and bigrams.
    vectorizer = TfidfVectorizer(
        token_pattern=r"[A-Za-z_][A-Za-z0-9_]*|\d+|[^\sA-Za-z0-9_]", ngram_range=(1, 2), min_df=2, sublinear_tf=True
    )
    x_train = vectorizer.fit_transform([r["text"] for r in train])
    classifier = LogisticRegression(max_iter=2000, C=4.0, random_state=seed).fit(x_train, y_train)
    predicted = classifier.predict(vectorizer.transform([r["text"] for r in val]))
    out = {}
    for name, guesses in (("majority", [majority] * len(y_val)), ("tfidf_logreg", list(predicted))):
        out[name] = {
            "accuracy": accuracy_score(y_val, guesses),
            "macro_f1": f1_score(y_val, guesses, labels=labels, average="macro", zero_division=0),
        }
    return out


def write_report(
    run_dir: Path, evaluation: int, labels: list[str], confusion: torch.Tensor, result: dict, baseline: dict
) -> Path:
    """run_dir/eval_report.md (and eval_report.json): the fine-tuned model against the baselines on the
    held-out split, and its confusion matrix."""
    rows = [
        "| model | accuracy | macro-F1 |",
        "|---|---|---|",
        f"| fine-tuned GPT | {result['val_accuracy']:.4f} | {result['val_macro_f1']:.4f} |",
    ]
    for name, b in baseline.items():
        rows.append(f"| {name.replace('_', ' ')} | {b['accuracy']:.4f} | {b['macro_f1']:.4f} |")
    matrix = ["| true \\ predicted | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
    for i, label in enumerate(labels):
        matrix.append(f"| {label} | " + " | ".join(str(int(v)) for v in confusion[i].tolist()) + " |")
    text = "\n".join(
        [
            f"# Classification: held-out evaluation {evaluation} of this run (the latest)",
            "",
            *rows,
            "",
            "## Confusion matrix (held-out)",
            "",
            *matrix,
            "",
        ]
    )
    path = run_dir / "eval_report.md"
    path.write_text(text)
    (run_dir / "eval_report.json").write_text(
        json.dumps(
            {
                "evaluation": evaluation,
                "labels": labels,
                "confusion": confusion.tolist(),
                **result,
                "baselines": baseline,
            },
            indent=1,
        )
    )
    return path
