"""Pretraining: next-token prediction over packed MDS shards, validated in bits per byte."""

from __future__ import annotations

import math
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

from model.gpt import GPT
from model.parallelize import token_cross_entropy, vocab_parallel_loss
from training.data.loader import TokenLoader, iter_val_batches
from training.data.prepare import ensure_data
from training.data.tokenizer import load_tokenizer, text_nats_and_bytes, token_byte_lengths


class PretrainTask:
    """The smallest Task (training/tasks/base.py): batches, a loss, an evaluation, and resumable data state."""

    model_cfg = None  # the job's model: section, sized to the tokenizer
    model_class = GPT
    vocab_parallel_loss = True  # loss() takes logits sharded over the vocabulary under tensor parallelism

    def __init__(self, cfg, dist_info, run_dir: Path):
        self.cfg, self.dist = cfg, dist_info
        data_dir = Path(cfg.data.dir)
        # every rank: one prepares under the data folder's lock, the others wait on it (no collective's timeout)
        self.meta = ensure_data(cfg.data, progress=dist_info.is_main)
        self.tokenizer_file = data_dir / "tokenizer.json"
        self.tokenizer = load_tokenizer(str(self.tokenizer_file))
        self.vocab_size = self.tokenizer.get_vocab_size()
        self.byte_lengths = torch.tensor(token_byte_lengths(self.tokenizer), dtype=torch.float64)
        # Tensor-parallel peers must see the same batch: streaming's replication gives
        # consecutive ranks the same samples, and our mesh puts TP on consecutive ranks.
        self.loader = TokenLoader(
            cfg.data, "train", cfg.train.micro_batch_size, seed=cfg.seed, replication=dist_info.tp
        )
        self._iter = None

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._iter is None:
            self._iter = iter(self.loader)
        x, y = next(self._iter)
        return x.to(self.dist.device, non_blocking=True), y.to(self.dist.device, non_blocking=True)

    def loss(self, model, batch) -> tuple[torch.Tensor, int]:
        x, y = batch
        if self.dist.tp > 1:  # vocab-sharded logits: the loss reads each rank's shard (vocab_parallel_loss)
            return token_cross_entropy(model(x), y, reduction="sum"), y.numel()
        return model(x, targets=y), y.numel()  # in chunks: never all of a step's logits at once

    def tokens_per_batch(self, batch) -> int:
        return batch[1].numel()

    def train_metrics(self) -> dict:
        return {}

    @torch.no_grad()
    @torch.compiler.set_stance("force_eager")
    def evaluate(self, model) -> dict:
        """Validation loss (nats/token, every target) and bits per byte (the targets that spell text) over the
        held-out split. Eager even when train.compile is on: a few forward passes don't repay compiling the
        blocks' inference graphs (and the short last batch's) on top of the training ones."""
        cfg = self.cfg
        sums = torch.zeros(4, dtype=torch.float64)  # nats, tokens, nats of text targets, their bytes
        for i, (x, y) in enumerate(iter_val_batches(cfg.data, cfg.train.micro_batch_size, replication=self.dist.tp)):
            if cfg.train.val_batches and i >= cfg.train.val_batches:
                break
            with vocab_parallel_loss() if self.dist.tp > 1 else nullcontext():
                loss = token_cross_entropy(model(x.to(self.dist.device)), y.to(self.dist.device), reduction="none")
            loss = loss.double().cpu()
            text_nats, nbytes = text_nats_and_bytes(loss, y.view(-1), self.byte_lengths)
            sums += torch.stack([loss.sum(), torch.tensor(float(y.numel()), dtype=torch.float64), text_nats, nbytes])
        if self.dist.world_size > 1:
            sums = sums.to(self.dist.device)
            dist.all_reduce(sums)  # TP peers counted the same batch: the ratios below are unaffected
            sums = sums.cpu()
        nats, tokens, text_nats, nbytes = sums.tolist()
        return {
            "val_loss": nats / tokens,
            "val_bpb": text_nats / math.log(2) / nbytes,
            "xz_bpb": self.meta.get("xz_bpb_val"),
        }

    def state_dict(self) -> dict:
        return {"loader": self.loader.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state["loader"])
        self._iter = None
