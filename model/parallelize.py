"""How a GPT is spread over a device mesh: tensor parallel, then activation checkpointing,
then per-block compile, then FSDP2. The same order torchtitan uses, for the same reasons:
TP rewrites the modules' parameters into DTensors that FSDP then shards along data-parallel ranks.
Under TP the output head's logits stay sharded over the vocabulary for a loss computed on the shards
(vocab_parallel_loss, token_cross_entropy); every other caller gets them whole.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    loss_parallel,
    parallelize_module,
)

from model.gpt import GPT


def apply_tensor_parallel(model: GPT, tp_mesh: DeviceMesh) -> None:
    """Megatron-style TP with sequence-parallel norms.

    Between blocks the residual stream is sharded along the sequence (Shard(1)), so the
    norms and the residual adds each do 1/tp of the work; attention and the MLP gather it
    (Replicate) on the way in and reduce-scatter it on the way out.
    """
    tp = tp_mesh.size()
    cfg = model.cfg
    if cfg.n_head % tp or cfg.kv_heads % tp:
        raise ValueError(f"parallel.tp={tp} must divide model.n_head={cfg.n_head} and the kv heads={cfg.kv_heads}")
    parallelize_module(
        model,
        tp_mesh,
        {
            "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
            "norm": SequenceParallel(),
            # Logits stay sharded over the vocabulary: a loss takes them so in vocab_parallel_loss(), anything
            # else gets them whole from the hook below.
            "output": ColwiseParallel(input_layouts=Shard(1), output_layouts=Shard(-1), use_local_output=False),
        },
    )
    if cfg.tie_embeddings:  # parallelize_module made new Parameters; both are Shard(0) over the vocab
        model.output.weight = model.tok_embeddings.weight
    model.register_forward_hook(_whole_logits_outside_vocab_parallel_loss)
    for block in model.layers:
        mlp_in = {"feed_forward.w1": ColwiseParallel()}
        if hasattr(block.feed_forward, "w3"):  # SwiGLU's second input matrix (relu2 has none)
            mlp_in["feed_forward.w3"] = ColwiseParallel()
        # Per-head q/k gains see only this rank's heads [batch, heads, seq, head_dim]: replicated, their gradients
        # summed over the tensor-parallel ranks.
        qk_norms = {
            f"attention.{n}": SequenceParallel(sequence_dim=1, use_local_output=True)
            for n in ("q_norm", "k_norm")
            if hasattr(block.attention, n)
        }
        parallelize_module(
            block,
            tp_mesh,
            {
                "attention_norm": SequenceParallel(),
                "attention": PrepareModuleInput(
                    input_layouts=(Shard(1), None, None, None), desired_input_layouts=(Replicate(), None, None, None)
                ),
                "attention.wq": ColwiseParallel(),
                "attention.wk": ColwiseParallel(),
                "attention.wv": ColwiseParallel(),
                "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
                **qk_norms,
                "ffn_norm": SequenceParallel(),
                "feed_forward": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
                **mlp_in,
                "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
            },
        )


_VOCAB_PARALLEL = ContextVar("vocab_parallel_loss", default=False)


@contextmanager
def vocab_parallel_loss() -> Iterator[None]:
    """Within: a tensor-parallel GPT returns its logits as a DTensor sharded over the vocabulary, and
    token_cross_entropy on them runs on the shards (torch's loss_parallel), so no rank holds logits over
    the whole vocabulary, nor their gradient. The loss's backward must run inside as well."""
    token = _VOCAB_PARALLEL.set(True)
    try:
        with loss_parallel():
            yield
    finally:
        _VOCAB_PARALLEL.reset(token)


def _whole_logits_outside_vocab_parallel_loss(module, args, logits):
    """Generation, log-probabilities, accuracy: callers outside vocab_parallel_loss() get every rank the whole
    logits as a plain tensor, as from a model without tensor parallelism."""
    if isinstance(logits, DTensor) and not _VOCAB_PARALLEL.get():
        return logits.full_tensor()
    return logits


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, **kwargs) -> torch.Tensor:
    """F.cross_entropy of [batch, seq, vocab] logits against [batch, seq] targets, the logits whole or
    (in vocab_parallel_loss) sharded over the vocabulary; a plain tensor either way."""
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), **kwargs)
    return loss.full_tensor() if isinstance(loss, DTensor) else loss


def apply_activation_checkpointing(model: GPT) -> None:
    """Recompute each block's activations in backward: trades ~30% more compute for memory."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for i, block in enumerate(model.layers):
        model.layers[i] = checkpoint_wrapper(block, preserve_rng_state=False)


def apply_compile(model: GPT) -> None:
    """Compile block by block: blocks are identical, so one graph is reused and compile stays fast.
    The loss head too: the output matmul's casts, soft-cap and softmax then fuse instead of each
    passing over the logits (on 2 CPU cores, 0.85x the step's CPU time of compiled blocks alone)."""
    for block in model.layers:
        block.compile(fullgraph=True)
    model.loss = torch.compile(model.loss, fullgraph=True)


def apply_fsdp(model: GPT, dp_mesh: DeviceMesh, param_dtype: torch.dtype) -> None:
    """FSDP2: each block is one all-gather unit, and so are the embeddings and the head (torchtitan's layout): as
    units of their own their all-gathers are prefetched behind the neighbouring block's compute, and the
    embeddings' gradient is reduced as soon as backward reaches them, where the root's waited for the end.
    Tied embeddings share one weight between the first and last: those stay in the root. The final norm (d_model
    numbers) stays in the root too: a unit of [norm, head] fails to sum HSDP's gradients deferred over
    micro-batches (torch 2.14's FSDP2 adds the head's shard to the norm's)."""
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    n = len(model.layers)
    if not model.cfg.tie_embeddings:
        fully_shard(model.tok_embeddings, mesh=dp_mesh, mp_policy=mp)
    for i, block in enumerate(model.layers):
        # The last block's parameters are needed again at once by backward: keep them gathered.
        fully_shard(block, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=i < n - 1)
    if not model.cfg.tie_embeddings:  # the head is the first thing backward needs: keep it gathered
        fully_shard(model.output, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=False)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp)


def parallelize(
    model: GPT,
    mesh: Optional[DeviceMesh],
    *,
    param_dtype: torch.dtype,
    compile: bool = False,
    activation_checkpointing: bool = False,
) -> nn.Module:
    if mesh is not None and mesh["tp"].size() > 1:
        apply_tensor_parallel(model, mesh["tp"])
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if compile:
        apply_compile(model)
    if mesh is not None:
        dp_replicate, dp_shard = mesh["dp_replicate"].size(), mesh["dp_shard"].size()
        if dp_replicate > 1:  # HSDP: replicate across groups, shard within each
            apply_fsdp(model, mesh["dp_replicate", "dp_shard"], param_dtype)
        elif dp_shard > 1:
            apply_fsdp(model, mesh["dp_shard"], param_dtype)
    return model
