"""Direct Preference Optimization: raise the answers people chose over the ones they rejected,
relative to a frozen copy of the starting model (Rafailov et al. 2023).

The policy starts from checkpoint.init_from (normally an SFT run); the reference is the same
weights, frozen, and its log-probs are computed alongside, without gradients. With lora.enabled the
reference is the policy itself with its adapters off (the base), so no second copy is built. TRL's options:

    dpo.loss_type                sigmoid | robust | hinge | ipo, with dpo.label_smoothing (losses.py dpo_loss)
    dpo.reference_free           no reference: its log-probs are 0
    dpo.rpo_alpha                adds rpo_alpha x the chosen answers' NLL (RPO)
    dpo.precompute_ref_log_probs the reference's log-probs of every pair in one pass before training, kept in
                                 the run folder (ref_logprobs.safetensors, read again on resume); the reference
                                 model is then dropped, so training holds one model

Evaluation is the held-out preference accuracy: the share of pairs whose chosen answer gets the higher
implicit reward beta * (log pi - log ref).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from model.gpt import GPT
from model.lora import adapters_disabled
from training.metrics import say
from training.posttrain.examples import eval_batches
from training.posttrain.losses import IGNORE, chosen_nll, dpo_loss, sequence_logprobs
from training.posttrain.metric_sums import MetricSums
from training.posttrain.pairs import PreferenceData

REF_LOGPROBS = "ref_logprobs.safetensors"  # in the run folder, with dpo.precompute_ref_log_probs


def pair_key(record: dict) -> str:
    """A pair's identity in the precomputed table: a hash of its prompt and answers."""
    text = json.dumps([record["prompt"], record["chosen"], record["rejected"]], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


class DPOTask:
    model_class = GPT
    vocab_parallel_loss = False

    def __init__(self, cfg, dist_info, run_dir: Path):
        from training.build import build_model, load_weights, precision

        self.cfg, self.dist, self.d = cfg, dist_info, cfg.dpo
        self.beta = cfg.dpo.beta
        if self.beta <= 0:
            raise ValueError(f"dpo.beta={self.beta} must be positive (typical values 0.05 to 0.5)")
        self.data = PreferenceData(cfg, dist_info, "dpo")
        self.model_cfg = self.data.model_cfg  # the trainer builds the policy in the source's shape
        self.tokenizer_file = self.data.tokenizer_file
        self.vocab_size = self.model_cfg.vocab_size
        self.reference = None  # with LoRA the reference is the policy with its adapters off: no second copy
        self.table = None  # pair key -> (chosen, rejected) reference log-probs, when precomputed
        if self.d.precompute_ref_log_probs:
            self.table = self._load_table(Path(run_dir) / REF_LOGPROBS)
        if (
            self.table is None
            and not self.d.reference_free
            and (self.d.precompute_ref_log_probs or not cfg.lora.enabled)
        ):
            param_dtype, _ = precision(cfg, dist_info)
            self.reference = build_model(self.model_cfg, cfg, dist_info, param_dtype, trainable=False)
            load_weights(self.reference, cfg.checkpoint.init_from, dist_info.is_main)
        if self.d.precompute_ref_log_probs and self.table is None:
            self.table = self._precompute(Path(run_dir) / REF_LOGPROBS)
            self.reference = None  # the table replaces it for the rest of the run
        self.metrics = MetricSums()

    # ------------------------------------------------------------ the reference's log-probs

    def _records(self) -> list[dict]:
        return self.data.train + self.data.val

    def _precompute(self, path: Path) -> dict:
        """One pass of the reference over every pair (every rank the same batches: a sharded reference needs
        every rank in every forward pass), written by rank 0 as safetensors: chosen [N], rejected [N]."""
        records = self._records()
        keys = [pair_key(r) for r in records]
        chosen, rejected = [], []
        size = self.cfg.train.micro_batch_size
        with torch.no_grad():
            for i in range(0, len(records), size):
                batch = self.data.encode(records[i : i + size])
                ref = self._seq(self.reference(batch["tokens"]), batch["labels"]).float().cpu()
                half = ref.shape[0] // 2
                chosen.append(ref[:half])
                rejected.append(ref[half:])
        tensors = {"chosen": torch.cat(chosen), "rejected": torch.cat(rejected)}
        if self.dist.is_main:
            from safetensors.torch import save_file

            tmp = path.with_suffix(".tmp")
            save_file(tensors, str(tmp), metadata={"keys": json.dumps(keys), "loss_type": self.d.loss_type})
            os.replace(tmp, path)
        say(f"DPO: the reference's log-probs of {len(keys)} pairs precomputed into {path}", self.dist.is_main)
        return {k: (c, r) for k, c, r in zip(keys, tensors["chosen"].tolist(), tensors["rejected"].tolist())}

    def _load_table(self, path: Path):
        """The table a previous attempt of this run wrote, if it covers these pairs under this loss type."""
        if not path.is_file():
            return None
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in ("chosen", "rejected")}
        keys = json.loads(meta.get("keys", "[]"))
        if meta.get("loss_type") != self.d.loss_type or set(keys) != {pair_key(r) for r in self._records()}:
            return None
        return {k: (c, r) for k, c, r in zip(keys, tensors["chosen"].tolist(), tensors["rejected"].tolist())}

    def _seq(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Sequence log-probs [rows]; IPO's are per-token means, as TRL computes them."""
        logp = sequence_logprobs(logits, labels)
        if self.d.loss_type == "ipo":
            logp = logp / (labels != IGNORE).sum(-1).clamp(min=1)
        return logp

    def _reference(self, model, batch: dict) -> torch.Tensor:
        if self.d.reference_free:
            return torch.zeros(batch["tokens"].shape[0], device=batch["tokens"].device)
        if self.table is not None:
            pairs = [self.table[k] for k in batch["keys"]]
            values = [c for c, _ in pairs] + [r for _, r in pairs]
            return torch.tensor(values, device=batch["tokens"].device)
        with torch.no_grad(), adapters_disabled(model):
            reference = model if self.reference is None else self.reference
            return self._seq(reference(batch["tokens"]), batch["labels"])

    # ------------------------------------------------------------ the trainer's interface

    def _encode(self, records: list[dict]) -> dict:
        batch = self.data.encode(records)
        batch["keys"] = [pair_key(r) for r in records]
        return batch

    def next_batch(self) -> dict:
        return self._encode(self.data.stream.next())

    def _forward(self, model, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Sequence log-probs [2B] under the model and the reference, and RPO's NLL of the chosen answers."""
        logits = model(batch["tokens"])
        policy = self._seq(logits, batch["labels"])
        half = policy.shape[0] // 2
        nll = chosen_nll(logits[:half], batch["labels"][:half]) if self.d.rpo_alpha else None
        return policy, self._reference(model, batch), nll

    def _loss(self, policy, reference, i: slice, j: slice):
        return dpo_loss(
            policy[i],
            policy[j],
            reference[i],
            reference[j],
            self.beta,
            loss_type=self.d.loss_type,
            label_smoothing=self.d.label_smoothing,
        )

    def loss(self, model, batch) -> tuple[torch.Tensor, int]:
        policy, reference, nll = self._forward(model, batch)
        half = policy.shape[0] // 2
        loss, metrics = self._loss(policy, reference, slice(0, half), slice(half, None))
        if nll is not None:
            loss = loss + self.d.rpo_alpha * nll
            metrics["nll_loss"] = nll.detach()
        self.metrics.add(metrics)
        return loss * half, half  # dpo_loss is the mean over the pairs

    def tokens_per_batch(self, batch) -> int:
        return batch["tokens"].numel()

    def train_metrics(self) -> dict:
        return self.metrics.mean(self.dist.device, self.dist.world_size)

    @torch.no_grad()
    def evaluate(self, model) -> dict:
        sums = MetricSums()
        for records, weights in eval_batches(self.data.val, self.data.batch_size, self.dist.dp_rank, self.dist.dp_size):
            policy, reference, _ = self._forward(model, self._encode(records))
            half = policy.shape[0] // 2
            for i in range(half):  # per pair, so the padding pairs (weight 0) count for nothing
                loss, m = self._loss(policy, reference, slice(i, i + 1), slice(half + i, half + i + 1))
                sums.add(
                    {
                        "val_loss": loss,
                        "val_accuracy": m["rewards/accuracies"],
                        **{f"val_{k}": v for k, v in m.items() if k != "rewards/accuracies"},
                    },
                    float(weights[i]),
                )
        return sums.mean(self.dist.device, self.dist.world_size)

    def state_dict(self) -> dict:
        return {"stream": self.data.stream.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.data.stream.load_state_dict(state["stream"])
