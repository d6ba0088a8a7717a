"""Pretraining: next-token prediction over packed MDS shards, validated in bits per byte."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.distributed as dist

from training.data.loader import TokenLoader, iter_val_batches
from training.data.prepare import ensure_data
from training.data.tokenizer import load_tokenizer, token_byte_lengths


class PretrainTask:
    """What the trainer asks of a task: batches, a loss, an evaluation, and resumable data state."""

    def __init__(self, cfg, dist_info):
        self.cfg, self.dist = cfg, dist_info
        data_dir = Path(cfg.data.dir)
        if dist_info.is_main:
            self.meta = ensure_data(cfg.data, progress=True)
        dist_info.barrier()
        if not dist_info.is_main:
            self.meta = ensure_data(cfg.data, progress=False)  # prepared by rank 0: only reads meta.json
        self.tokenizer = load_tokenizer(str(data_dir / "tokenizer.json"))
        self.vocab_size = self.tokenizer.get_vocab_size()
        self.byte_lengths = torch.tensor(token_byte_lengths(self.tokenizer), dtype=torch.float64)
        # Tensor-parallel peers must see the same batch: streaming's replication gives
        # consecutive ranks the same samples, and our mesh puts TP on consecutive ranks.
        self.loader = TokenLoader(cfg.data, "train", cfg.train.micro_batch_size, seed=cfg.seed,
                                  replication=dist_info.tp)
        self._iter = None

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._iter is None:
            self._iter = iter(self.loader)
        x, y = next(self._iter)
        return x.to(self.dist.device, non_blocking=True), y.to(self.dist.device, non_blocking=True)

    def loss(self, model, batch) -> torch.Tensor:
        x, y = batch
        return model(x, targets=y) / y.numel()

    def tokens_per_batch(self, batch) -> int:
        return batch[1].numel()

    @torch.no_grad()
    @torch.compiler.set_stance("force_eager")
    def evaluate(self, model) -> dict:
        """Validation loss (nats/token) and bits per byte over the held-out split.

        Eager even when train.compile is on: a few forward passes don't repay compiling the blocks'
        inference graphs (and the short last batch's) on top of the training ones."""
        cfg = self.cfg
        nats = torch.zeros((), dtype=torch.float64)
        tokens = torch.zeros((), dtype=torch.float64)
        nbytes = torch.zeros((), dtype=torch.float64)
        for i, (x, y) in enumerate(iter_val_batches(cfg.data, cfg.train.micro_batch_size, replication=self.dist.tp)):
            if cfg.train.val_batches and i >= cfg.train.val_batches:
                break
            x, y = x.to(self.dist.device), y.to(self.dist.device)
            nats += model(x, targets=y).double().cpu()
            tokens += y.numel()
            nbytes += self.byte_lengths[y.view(-1).cpu()].sum()
        if self.dist.world_size > 1:
            sums = torch.stack([nats, tokens, nbytes]).to(self.dist.device)
            dist.all_reduce(sums)  # TP peers counted the same batch: the ratios below are unaffected
            nats, tokens, nbytes = sums.cpu()
        val_loss = (nats / tokens).item()
        val_bpb = (nats / math.log(2) / nbytes).item()
        return {"val_loss": val_loss, "val_bpb": val_bpb, "xz_bpb": self.meta.get("xz_bpb_val")}

    def state_dict(self) -> dict:
        return {"loader": self.loader.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state["loader"])
        self._iter = None
