"""CPU fp32 linears that multiply decode batches by the GGUF file's own 4/8-bit blocks (kernels/quant_linear.py).

Why: one decode step reads every weight once for a handful of rows, so its matmuls cost what the weights weigh in
bytes. SmolLM2's file stores its linears as Q4_1 and its (tied) embedding as Q8_0; read as those blocks, a step
reads about 110 MB instead of the 540 MB fp32 copy (Qwen2.5-Coder, Q5_0/Q4_K/Q6_K: 0.5B 0.54 GB instead of 2.0 GB,
1.5B 1.4 GB instead of 6.2 GB). The kernel dequantizes exactly, so the weights are the same
numbers as the fp32 path's; only the order of the fp32 sums differs (tested against the fp32 path and against
transformers). Rows are independent in the kernel: a sequence's result is bit-identical alone or in any batch of
up to `max_rows` rows (a larger step, e.g. decodes beside a long prefill chunk, takes the fp32 GEMM whole).

Batches of more than `max_rows` rows (prefill chunks, where the fp32 GEMM is compute-bound and MKL is faster) keep
the fp32 weight, which the module shares with the model (no copy).

# M=rows in the call, K=in features, N=out features
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels.cpu_native import native_kernels
from kernels.quant_linear import BlockQuantRows, PackedBlockWeight, native_block_quant_linear
from workers.model.gguf_loader import GGUFBlockTensor
from workers.model.packed_linear import SharedWeightLinear

# Our fused linears and the HF weights stacked into them, in order (workers/model/llama.py STACKED_PARAMS).
_FUSED_SOURCES = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "self_attn.o_proj": ("self_attn.o_proj",),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp.down_proj": ("mlp.down_proj",),
}


class BlockQuantLinear(SharedWeightLinear):
    def __init__(self, linear: nn.Linear, packed: PackedBlockWeight, max_rows: int = 64):
        super().__init__()
        if (packed.out_features, packed.in_features) != tuple(linear.weight.shape):
            raise ValueError(f"blocks of shape {(packed.out_features, packed.in_features)} for a linear of "
                             f"{tuple(linear.weight.shape)}")
        self.weight = linear.weight  # shared: the > max_rows path, tied embeddings
        self.bias = linear.bias
        self.packed = packed
        self.max_rows = max_rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] -> [..., N]"""
        num_rows = x.numel() // x.shape[-1] if x.dim() else 0
        if 0 < num_rows <= self.max_rows:
            out = native_block_quant_linear(x, self.packed, self.bias)
            if out is not None:
                return out
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, {self.packed.kind} blocks "
                f"({self.packed.nbytes / 2**20:.1f} MiB), rows<={self.max_rows}")


def quantize_linears(model: nn.Module, block_tensors: dict[str, GGUFBlockTensor], max_rows: int = 64) -> int:
    """Swap every fp32 CPU linear whose weights the file stores in block types the kernel reads for a
    BlockQuantLinear, in place; returns how many. A fused linear whose parts differ in type takes the narrowest
    format that holds each part exactly (BlockQuantRows.concat). Nothing is swapped where the native kernels cannot
    be built (the fp32 path stays)."""
    if not block_tensors or native_kernels() is None:
        return 0
    swaps: list[tuple[nn.Module, str, list[str]]] = []
    for index, layer in enumerate(model.layers):
        for ours, sources in _FUSED_SOURCES.items():
            parent_name, child_name = ours.rsplit(".", 1)
            swaps.append((layer.get_submodule(parent_name), child_name,
                          [f"model.layers.{index}.{source}.weight" for source in sources]))
    # The head reads the embedding's blocks when tied (SmolLM2: Q8_0), else its own (Qwen2.5-Coder: Q8_0, Q6_K).
    head_source = "model.embed_tokens.weight" if model.config.tie_word_embeddings else "lm_head.weight"
    swaps.append((model, "lm_head", [head_source]))
    swapped = 0
    for parent, child_name, names in swaps:
        linear = getattr(parent, child_name)
        if type(linear) is not nn.Linear or linear.weight.dtype != torch.float32 or \
                linear.weight.device.type != "cpu" or not all(name in block_tensors for name in names):
            continue
        parts = [block_tensors[name].rows() for name in names]
        rows = parts[0] if len(parts) == 1 else BlockQuantRows.concat(parts)
        setattr(parent, child_name, BlockQuantLinear(linear, PackedBlockWeight.pack(rows), max_rows))
        swapped += 1
    return swapped
