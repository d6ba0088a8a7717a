"""Peak GPU memory per GPU for pretraining 125M, 1.3B and 7B GPTs: a table to plan a cluster from.

    python -m bench.memory_plan                  # the table (dp 8 x tp 1/2/8, seq 2048/8192), into docs/performance.md
    python -m bench.memory_plan --micro-batch 2  # sequences per GPU per micro-step (activations, logits scale with it)

Computed, not measured: the bytes each tensor of a training step takes, as orch trains (training/trainer.py,
model/parallelize.py): FSDP2 over the data-parallel ranks whenever dp > 1, with bf16 compute and fp32 master
weights, gradients and AdamW moments; tensor parallelism with sequence-parallel norms; the vocabulary sharded
under tp with the loss on the shards; flash attention (SDPA) and a fused RMSNorm. Each model's parameter count
is checked against a meta-device build of it (nothing allocated). tests/gpu/test_memory_plan.py compares the
peak with torch.cuda.max_memory_allocated on one GPU for the sizes that fit there.

What the figures are: the peak of memory allocated to tensors (what torch.cuda.max_memory_allocated reports),
the larger of two moments: the start of the backward (every activation saved, the loss's gradient over the
vocabulary) and the optimizer step (every gradient). Add 1-3 GiB per GPU for the CUDA context, NCCL's buffers
and the allocator's fragmentation. Gradient accumulation adds the gradients (4 bytes a parameter, sharded: the
trainer reduce-scatters each micro-batch's, so no rank holds unsharded ones between micro-batches) to the first
moment.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from model.config import SIZES as NAMED_SIZES
from model.config import GPTConfig
from model.gpt import GPT

GIB = 2**30
# GPT-3's 125M and 1.3B shapes with the GPT-2 vocabulary and Llama-2-7B's shape: model/config.py's named sizes.
SIZES = {name: NAMED_SIZES[name] for name in ("125m", "1.3b", "7b")}


@dataclass
class Parameters:
    total: int
    root: int  # what FSDP's root unit holds: the embedding, the final norm, the output head
    block: int  # one transformer block
    cast: int  # what autocast copies to bf16 for the matmuls: all but the embedding (a lookup)


def parameters(cfg: GPTConfig) -> Parameters:
    d, hd, kv = cfg.d_model, cfg.head_dim, cfg.kv_heads
    block = d * cfg.n_head * hd + 2 * d * kv * hd + cfg.n_head * hd * d + 3 * d * cfg.hidden_dim + 2 * d
    embedding = cfg.vocab_size * d
    root = embedding + d + (0 if cfg.tie_embeddings else embedding)
    total = root + cfg.n_layer * block
    return Parameters(total, root, block, total - embedding)


def meta_parameter_count(cfg: GPTConfig) -> int:
    """The model as the trainer builds it, on the meta device: its real parameter count, without memory."""
    with torch.device("meta"):
        return GPT(cfg).num_params()


def layer_activations(cfg: GPTConfig, tp: int, fsdp: bool) -> dict[str, float]:
    """Bytes one block saves for its backward, per token, by what saves them.

    fsdp (FSDP's bf16 parameters): every activation is bf16. Otherwise (autocast: one GPU, or tp alone) the
    residual stream stays fp32 and each Linear saves a bf16 copy of its own input.
    Under tp the norms work on sequence shards; the attention's and the MLP's inputs are gathered whole."""
    d, f, kv = cfg.d_model, cfg.hidden_dim, cfg.kv_heads * cfg.head_dim
    return {
        "norm_inputs": (2 if fsdp else 4) * 2 * d / tp,  # the attention's and the MLP's RMSNorm
        "linear_inputs": 2 * (2 if fsdp else 5) * d,  # the normed inputs of wq/wk/wv and w1/w3
        # q and the attention output, k and v, flash attention's logsumexp (fp32), the SwiGLU's four tensors
        "attention_and_mlp": (2 * (2 * d + 2 * kv + 4 * f) + 4 * cfg.n_head) / tp,
    }


def plan(
    cfg: GPTConfig,
    seq: int,
    dp: int,
    tp: int,
    micro_batch: int = 1,
    activation_checkpointing: bool = False,
    fsdp: bool | None = None,
) -> dict[str, float] | None:
    """Bytes per GPU, by component, and the peak; None when tp doesn't divide the heads. fsdp: whether FSDP
    wraps the model; by default as the trainer decides, when data parallel > 1 (model/parallelize.py)."""
    if cfg.n_head % tp or cfg.kv_heads % tp:
        return None
    fsdp = dp > 1 if fsdp is None else fsdp
    p = parameters(cfg)
    shard = dp * tp if fsdp else tp
    tokens = micro_batch * seq
    layer = sum(layer_activations(cfg, tp, fsdp).values())
    if activation_checkpointing:  # each block keeps its input; one block's activations are rebuilt at a time
        saved = cfg.n_layer * (2 if fsdp else 4) * cfg.d_model / tp + layer
    else:
        saved = cfg.n_layer * layer
    head_input = (2 if fsdp else 4) * cfg.d_model / tp + 2 * cfg.d_model  # the final norm's input, the head's
    out = {
        "weights": 4 * p.total / shard,  # fp32 master weights
        "adamw": 8 * p.total / shard,  # two fp32 moments
        "grads": 4 * p.total / shard,
        # FSDP: the root unit's bf16 weights and gradients held through the step, three blocks' bf16 weights
        # gathered (the last, the current, the prefetched), one block's bf16 and fp32 gradients being reduced.
        # Autocast: a bf16 copy of every matmul weight, kept for the backward.
        "compute_weights": (4 * p.root + 12 * p.block) / tp if fsdp else 2 * p.cast / tp,
        "activations": tokens * (saved + head_input),
        # fp32 log-softmax saved, its gradient and the logits' gradient, over this rank's share of the vocabulary
        "logits": 12 * tokens * cfg.vocab_size / tp,
    }
    backward_start = out["weights"] + out["adamw"] + out["compute_weights"] + out["activations"] + out["logits"]
    optimizer_step = out["weights"] + out["adamw"] + out["grads"] + (4 * p.root / tp if fsdp else 0)
    out["peak"] = max(backward_start, optimizer_step)
    return out


def table(micro_batch: int) -> tuple[str, list[dict]]:
    rows = [
        "| model | parameters | tp | GPUs (dp 8) | seq | weights + AdamW + grads | activations "
        "(checkpointed) | logits | peak | peak, checkpointed |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    records = []
    for name, cfg in SIZES.items():
        n = parameters(cfg).total
        for tp in (1, 2, 8):
            for seq in (2048, 8192):
                full = plan(cfg, seq, 8, tp, micro_batch)
                if full is None:
                    rows.append(
                        f"| {name} | {n / 1e9:.2f}B | {tp} | {8 * tp} | {seq} | tp must divide the "
                        f"{cfg.n_head} heads | | | | |"
                    )
                    continue
                ckpt = plan(cfg, seq, 8, tp, micro_batch, activation_checkpointing=True)
                state = (full["weights"] + full["adamw"] + full["grads"]) / GIB
                rows.append(
                    f"| {name} | {n / 1e9:.2f}B | {tp} | {8 * tp} | {seq} | {state:.1f} | "
                    f"{full['activations'] / GIB:.1f} ({ckpt['activations'] / GIB:.1f}) | "
                    f"{full['logits'] / GIB:.1f} | {full['peak'] / GIB:.1f} GiB | {ckpt['peak'] / GIB:.1f} GiB |"
                )
                records.append(
                    {
                        "model": name,
                        "tp": tp,
                        "dp": 8,
                        "seq": seq,
                        "micro_batch": micro_batch,
                        "plan_gib": {k: v / GIB for k, v in full.items()},
                        "checkpointed_gib": {k: v / GIB for k, v in ckpt.items()},
                    }
                )
    return "\n".join(rows), records


def main() -> None:
    from bench.common import write_result
    from bench.run import DOC

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--micro-batch", type=int, default=1, help="sequences per GPU per micro-step")
    args = p.parse_args()
    counts = {}
    for name, cfg in SIZES.items():
        counts[name] = meta_parameter_count(cfg)
        if counts[name] != parameters(cfg).total:
            raise SystemExit(
                f"{name}: the plan counts {parameters(cfg).total:,} parameters, the meta-device build "
                f"{counts[name]:,}: fix parameters() before trusting the table"
            )
        print(f"{name}: {counts[name]:,} parameters (meta-device build = the plan's count)")
    text, records = table(args.micro_batch)
    print(text)
    if args.micro_batch == 1:  # the documented table
        doc = DOC.read_text()
        head, rest = doc.split("<!-- memory_plan -->", 1)
        _, tail = rest.split("<!-- /memory_plan -->", 1)
        DOC.write_text(f"{head}<!-- memory_plan -->\n{text}\n<!-- /memory_plan -->{tail}")
    config = {
        "computed": True,
        "micro_batch": args.micro_batch,
        "dp": 8,
        "sizes": {
            k: {
                "n_layer": c.n_layer,
                "n_head": c.n_head,
                "d_model": c.d_model,
                "ffn": c.hidden_dim,
                "vocab": c.vocab_size,
                "params": counts[k],
            }
            for k, c in SIZES.items()
        },
    }
    print("wrote", write_result("memory_plan", config, {"rows": records}))


if __name__ == "__main__":
    main()
