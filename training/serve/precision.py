"""Serving in low precision: --dtype bf16|fp32, and --quantize int8 (weight-only).

int8 keeps each Linear's weight as int8 with one scale per output row (absmax / 127) and multiplies with
torch's own CPU kernel for it (torch._weight_int8pack_mm): a quarter of fp32's weight bytes, which is what a
decode step reads. Activations, embeddings, norms and the KV cache stay in the model's dtype.
"""

from __future__ import annotations

import torch
from torch import nn

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class Int8Linear(nn.Module):
    """y = x W^T (+ b) with W stored as int8 rows times a per-row scale."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype):
        super().__init__()
        w = linear.weight.detach().float()
        scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
        self.register_buffer("weight_int8", (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(dtype))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().to(dtype), requires_grad=False)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(self.scale.dtype)
        y = torch._weight_int8pack_mm(flat, self.weight_int8, self.scale)
        if self.bias is not None:  # qkv_bias (Qwen2's query/key/value biases)
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace every nn.Linear of the model (in place) by an Int8Linear of the same dtype."""
    dtype = next(iter(model.parameters())).dtype
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, child_name, Int8Linear(child, dtype))
    return model


def prepare(model: nn.Module, dtype: str = "fp32", quantize: str | None = None) -> nn.Module:
    """The model in the serving precision: cast to dtype, then quantized if asked."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: choose one of {sorted(DTYPES)}")
    model = model.to(DTYPES[dtype])
    for name, buf in model.named_buffers():  # rotary tables stay fp32: bf16 would blur far positions
        if name.startswith("rope_"):
            buf.data = buf.data.float()
    if quantize not in (None, "none", "int8"):
        raise ValueError(f"--quantize {quantize!r}: choose int8 (or leave it out)")
    if quantize == "int8":
        if next(iter(model.parameters())).device.type != "cpu":
            raise ValueError("--quantize int8 uses torch's CPU int8 kernel: serve with --device cpu")
        quantize_int8(model)
    return model.eval()
