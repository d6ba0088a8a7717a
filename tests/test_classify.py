"""Classification (kind: classify): the metrics against scikit-learn, bad files stopped with one sentence
and exit 2, a real run from a tiny pretrain (labels.json, the report with its confusion matrix and the two
baselines), and `orch export --hf` read back by transformers' LlamaForSequenceClassification."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import POSTTRAIN_SEQ, REPO, TINY, env_for
from training.classify.metrics import scores

SEQ = 128  # texts are cut to this (the source model's rotary tables are longer)


def test_scores_match_scikit_learn():
    from sklearn.metrics import accuracy_score, f1_score

    gen = torch.Generator().manual_seed(0)
    truth = torch.randint(0, 4, (200,), generator=gen)
    guess = torch.where(torch.rand(200, generator=gen) < 0.6, truth, torch.randint(0, 4, (200,), generator=gen))
    guess[guess == 3] = 2  # a class never predicted: its F1 is 0
    confusion = torch.zeros(4, 4)
    for t, p in zip(truth.tolist(), guess.tolist()):
        confusion[t, p] += 1
    got = scores(confusion)
    assert got["accuracy"] == pytest.approx(accuracy_score(truth, guess))
    assert got["macro_f1"] == pytest.approx(f1_score(truth, guess, average="macro", zero_division=0))


def test_loss_is_a_sum_and_a_count_so_micro_batches_add_up_to_the_weighted_mean():
    """The trainer divides the step's summed loss by its summed count: with class weights the count is the
    weights' sum, so two micro-batches give exactly F.cross_entropy's weighted mean over the whole batch."""
    from types import SimpleNamespace

    import torch.nn.functional as F

    from training.tasks.classify import ClassifyTask

    gen = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(10, 3, generator=gen), torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 2, 0])
    weights = torch.tensor([0.4, 1.5, 3.0])
    model = lambda tokens, last: logits[tokens]  # noqa: E731  (the "model": the logits of these rows)
    for task_weights, expected in (
        (weights, F.cross_entropy(logits, labels, weight=weights)),
        (None, F.cross_entropy(logits, labels)),
    ):
        task = SimpleNamespace(weights=task_weights)
        parts = [
            ClassifyTask.loss(task, model, {"tokens": rows, "last": None, "labels": labels[rows]})
            for rows in (torch.arange(0, 3), torch.arange(3, 10))
        ]
        total, count = (sum(x) for x in zip(*parts))
        assert (total / count).item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.fixture(scope="module")
def source(posttrain_source, tmp_path_factory) -> dict:
    """The session's tiny pretrain, and the demo classification files derived from 200 stdlib files."""
    from training.classify.data import write_demo

    root = tmp_path_factory.mktemp("classify")
    train, val = write_demo(root / "classify", posttrain_source["tokenizer"], SEQ, max_docs=200)
    return {"run": posttrain_source["run"], "root": root, "train": train, "val": val}


def classify(source: dict, run_dir: Path, *extra: str, train=None, val=None) -> subprocess.CompletedProcess:
    overrides = [
        *TINY,
        f"model.max_seq_len={POSTTRAIN_SEQ}",
        f"data.seq_len={SEQ}",
        f"checkpoint.init_from={source['run']}",
        f"classify.train_file={train or source['train']}",
        f"classify.val_file={val or source['val']}",
        "train.log_every=1",
        "classify.val_max=64",
        *extra,
    ]
    cmd = [
        sys.executable,
        "-m",
        "training.main",
        str(REPO / "jobs" / "classify.yaml"),
        *overrides,
        "--run-dir",
        str(run_dir),
    ]
    return subprocess.run(
        cmd, cwd=source["root"], env=env_for(source["root"]), capture_output=True, text=True, timeout=600
    )


def test_demo_task_shares_no_module_and_is_balanced(source):
    train = [json.loads(line) for line in Path(source["train"]).read_text().splitlines()]
    val = [json.loads(line) for line in Path(source["val"]).read_text().splitlines()]
    for records in (train, val):
        labels = [r["label"] for r in records]
        assert labels.count("original") == labels.count("shuffled") >= 5
        # a shuffled body is its original's lines in another order: the same words, only the order differs
        originals = {tuple(sorted(r["text"].split("\n"))): r["text"] for r in records if r["label"] == "original"}
        for r in records:
            if r["label"] == "shuffled":
                assert originals[tuple(sorted(r["text"].split("\n")))] != r["text"]
    assert not {r["text"] for r in train} & {r["text"] for r in val}


@pytest.mark.slow
def test_classify_run_reports_against_baselines_and_exports_for_transformers(source, tmp_path):
    run_dir = source["root"] / "classify"
    result = classify(
        source, run_dir, "train.max_steps=6", "classify.train_last_blocks=1", "classify.class_weights=balanced"
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert json.loads((run_dir / "labels.json").read_text()) == ["original", "shuffled"]
    evals = [
        json.loads(line)
        for line in (run_dir / "metrics.jsonl").read_text().splitlines()
        if "lr" not in json.loads(line)
    ]
    final = evals[-1]
    assert {
        "val_loss",
        "val_accuracy",
        "val_macro_f1",
        "baseline_majority_macro_f1",
        "baseline_tfidf_logreg_macro_f1",
    } <= set(final)
    assert final["baseline_majority_macro_f1"] == pytest.approx(1 / 3, abs=0.05)  # one class of two, always
    report = (run_dir / "eval_report.md").read_text()
    assert "Confusion matrix" in report and "tfidf logreg" in report and "majority" in report
    confusion = json.loads((run_dir / "eval_report.json").read_text())["confusion"]
    n_val = len(Path(source["val"]).read_text().splitlines())
    assert sum(map(sum, confusion)) == min(64, n_val), "every held-out example counted once"
    # frozen blocks stay as they were: block 0 of the checkpoint equals the pretrain's
    from training.run_folder import read_checkpoint_model

    tuned = read_checkpoint_model(sorted((run_dir / "checkpoints").glob("step_*"))[-1])
    base = read_checkpoint_model(sorted((source["run"] / "checkpoints").glob("step_*"))[-1])
    assert torch.equal(tuned["layers.0.attention.wq.weight"], base["layers.0.attention.wq.weight"])
    assert not torch.equal(tuned["layers.1.attention.wq.weight"], base["layers.1.attention.wq.weight"])

    out = tmp_path / "hf"
    export = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "export", str(run_dir), "--hf", str(out)],
        cwd=source["root"],
        env=env_for(source["root"]),
        capture_output=True,
        text=True,
    )
    assert export.returncode == 0, export.stderr
    from transformers import LlamaForSequenceClassification

    from model.classifier import GPTClassifier

    hf = LlamaForSequenceClassification.from_pretrained(out).eval()
    assert hf.config.id2label == {0: "original", 1: "shuffled"}
    cfg, _ = load_hf_state_dict_without_head(out)
    ours = GPTClassifier(cfg, num_labels=2)
    ours.init_weights(seed=0)
    ours.load_state_dict({k: v for k, v in tuned.items()}, strict=False)
    ours.eval()
    from training.data.tokenizer import EOS_ID, PAD_ID

    rows = [[5, 9, 33, 70, EOS_ID], [12, 8, EOS_ID]]
    tokens = torch.full((2, 5), PAD_ID)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = torch.tensor(r)
    with torch.no_grad():
        theirs = hf(input_ids=tokens, attention_mask=(tokens != PAD_ID).long()).logits
        mine = ours(tokens, torch.tensor([4, 2]))
    assert (theirs - mine).abs().max().item() <= 1e-4


def load_hf_state_dict_without_head(folder):
    """The Llama config of an exported classifier (its score.weight is not a causal LM's tensor)."""
    from model.state_dict_adapter import config_from_hf

    return config_from_hf(json.loads((Path(folder) / "config.json").read_text()), folder), None


@pytest.mark.parametrize(
    "lines, message",
    [
        ([{"text": "a", "label": "x"}, {"text": "b", "label": "x"}], "a single label 'x'"),
        ([{"text": "a", "label": "x"}, {"text": "b"}], ":2 (classify.train_file): the record has no key 'label'"),
    ],
)
def test_bad_classification_files_stop_with_one_sentence(source, tmp_path, lines, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in lines))
    result = classify(source, tmp_path / "run", "train.max_steps=1", train=bad)
    assert result.returncode == 2
    assert message in result.stderr and str(bad) in result.stderr
