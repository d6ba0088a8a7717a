"""Sequence classification (kind: classify): a GPT from checkpoint.init_from with a linear head over the
final hidden state of each text's last token (model/classifier.py), trained with cross-entropy.

Texts are encoded as they are, then <|endoftext|>, whose hidden state the head reads; right-padded.
The label set (sorted) is written to the run folder as labels.json; evaluation logs val_loss,
val_accuracy and val_macro_f1 and writes eval_report.md with the confusion matrix beside the two
baselines (majority class, TF-IDF + logistic regression), which are fitted once at the start.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from model.classifier import GPTClassifier
from training.classify.data import DEMO_LABELS, label_set, read_examples, write_demo
from training.classify.metrics import baselines, scores, write_report
from training.data.special_tokens import special_tokens
from training.data.tokenizer import load_tokenizer
from training.metrics import say
from training.posttrain.examples import ExampleStream, eval_batches, pad_right
from training.run_folder import starting_point

LABELS_FILE = "labels.json"


class ClassifyTask:
    vocab_parallel_loss = False

    def __init__(self, cfg, dist_info, run_dir: Path):
        c = self.c = cfg.classify
        self.cfg, self.dist = cfg, dist_info
        if dist_info.tp > 1:
            raise ValueError(
                f"parallel.tp={dist_info.tp}: the classification head is not tensor-parallel; "
                "use parallel.tp=1 (data parallel) for classify jobs"
            )
        self.model_cfg, tokenizer_path = starting_point(cfg.checkpoint.init_from, cfg.data.tokenizer)
        self.tokenizer_file = tokenizer_path
        self.vocab_size = self.model_cfg.vocab_size
        self.tokenizer = load_tokenizer(tokenizer_path)
        self.max_len = min(cfg.data.seq_len, self.model_cfg.max_seq_len)
        train_path, val_path = Path(c.train_file or ""), Path(c.val_file or "")
        if not c.train_file:  # the demo task, derived once by rank 0
            if dist_info.is_main:
                write_demo(c.demo_dir, tokenizer_path, self.max_len, max_docs=cfg.data.max_docs)
            dist_info.barrier()
            train_path, val_path = Path(c.demo_dir) / "classify_train.jsonl", Path(c.demo_dir) / "classify_val.jsonl"
        self.train = read_examples(train_path, "classify.train_file")
        self.val = read_examples(val_path, "classify.val_file")[: c.val_max or None]
        self.labels = label_set(self.train, self.val, train_path, val_path)
        self.index = {label: i for i, label in enumerate(self.labels)}
        self.model_class = partial(GPTClassifier, num_labels=len(self.labels), train_last_blocks=c.train_last_blocks)
        counts = torch.tensor(
            [sum(r["label"] == label for r in self.train) for label in self.labels], dtype=torch.float
        )
        # balanced: n / (classes * count), sklearn's class_weight="balanced"
        self.weights = (
            (counts.sum() / (len(counts) * counts)).to(dist_info.device) if c.class_weights == "balanced" else None
        )
        self.stream = ExampleStream(
            self.train,
            cfg.train.micro_batch_size,
            dist_info.dp_rank,
            dist_info.dp_size,
            cfg.seed,
            "classify.train_file",
        )
        self.baselines = (
            baselines(self.train, self.val, self.labels, cfg.seed) if c.baselines and dist_info.is_main else {}
        )
        for name, b in self.baselines.items():
            say(f"baseline {name}: held-out accuracy {b['accuracy']:.4f}, macro-F1 {b['macro_f1']:.4f}", True)
        self.run_dir = run_dir
        self.evaluations = 0
        if dist_info.is_main:  # the label set, which export reads, and the baselines' figures
            (run_dir / LABELS_FILE).write_text(json.dumps(self.labels) + "\n")
            if self.baselines:
                (run_dir / "baselines.json").write_text(json.dumps(self.baselines, indent=1) + "\n")

    def encode(self, records: list[dict]) -> dict:
        special = special_tokens(self.tokenizer)  # the folder's own ids: the head reads at its end-of-sequence
        rows = [
            self.tokenizer.encode(r["text"], add_special_tokens=False).ids[: self.max_len - 1] + [special.eos]
            for r in records
        ]
        tokens, _ = pad_right(rows, special.pad)
        device = self.dist.device
        return {
            "tokens": tokens.to(device),
            "last": torch.tensor([len(r) - 1 for r in rows], device=device),
            "labels": torch.tensor([self.index[r["label"]] for r in records], device=device),
        }

    def next_batch(self) -> dict:
        return self.encode(self.stream.next())

    def loss(self, model, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-entropy summed over the rows, each weighted by its class (classify.class_weights), and the
        sum of those weights: the trainer's mean over the step is then cross_entropy's weighted mean."""
        logits = model(batch["tokens"], batch["last"])
        total = F.cross_entropy(logits, batch["labels"], weight=self.weights, reduction="sum")
        count = self.weights[batch["labels"]].sum() if self.weights is not None else batch["labels"].numel()
        return total, count

    def tokens_per_batch(self, batch) -> int:
        return batch["tokens"].numel()

    def train_metrics(self) -> dict:
        return {}

    @torch.no_grad()
    def evaluate(self, model) -> dict:
        k = len(self.labels)
        confusion = torch.zeros(k, k, dtype=torch.float64)
        nats = torch.zeros((), dtype=torch.float64)
        for records, weights in eval_batches(
            self.val, self.cfg.train.micro_batch_size, self.dist.dp_rank, self.dist.dp_size
        ):
            batch = self.encode(records)
            logits = model(batch["tokens"], batch["last"])
            keep = torch.tensor(weights, device=logits.device) > 0  # padding records count for nothing
            losses = F.cross_entropy(logits, batch["labels"], reduction="none")
            nats += losses[keep].double().sum().cpu()
            for t, p in zip(batch["labels"][keep].tolist(), logits.argmax(-1)[keep].tolist()):
                confusion[t, p] += 1
        if self.dist.world_size > 1:
            both = torch.cat([confusion.view(-1), nats.view(1)]).to(self.dist.device)
            dist.all_reduce(both)  # TP is refused: each rank counted its own records
            confusion, nats = both[:-1].cpu().view(k, k), both[-1].cpu()
        result = {"val_loss": (nats / confusion.sum()).item(), **{f"val_{m}": v for m, v in scores(confusion).items()}}
        self.evaluations += 1
        if self.dist.is_main:
            write_report(self.run_dir, self.evaluations, self.labels, confusion, result, self.baselines)
        result.update({f"baseline_{n}_macro_f1": b["macro_f1"] for n, b in self.baselines.items()})
        return result

    def state_dict(self) -> dict:
        return {"stream": self.stream.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state["stream"])


__all__ = ["ClassifyTask", "DEMO_LABELS"]
