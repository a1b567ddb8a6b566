"""CPU fp32 linears whose weight is packed once for MKL's GEMM: the batched-decode fast path.

Why: a decode step of 8-64 sequences multiplies a few rows by every weight matrix. At that size
torch's CPU matmul spends most of its time having MKL re-pack the whole weight into its panel layout
on every call (measured on a 2-core VM, SmolLM2-135M's 121 linears in isolation: 103 ms at 32 rows
plain, 57 ms with the weights packed once; inside the engine's 32-stream step, 69 -> 56 ms). Packing needs a fixed row count, so batches of
`min_rows`..`max_rows` rows run in slices of `rows`, the last slice zero-padded; fewer rows (one
stream: the weight read from DRAM is the cost and plain GEMV is as fast) and more rows (prefill
chunks: packing is amortised anyway) take torch's plain path.

Cost: MKL allocates more than it touches; resident memory grows by about one copy of the weights.
Rows are independent in a GEMM, so padding never changes a row's result, and at exactly `rows` rows
the packed and plain results are bit-identical (tested).

# N=rows in the call, K=in features, F=out features
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def mkl_packing_available() -> bool:
    return bool(torch._C.has_mkl) and hasattr(torch.ops.mkl, "_mkl_linear")


class SharedWeightLinear(nn.Module):
    """A linear that keeps the model's fp32 weight (shared, not copied) beside a faster form of it."""

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]


class MklPackedLinear(SharedWeightLinear):
    def __init__(self, linear: nn.Linear, rows: int = 32, min_rows: int = 8, max_rows: int = 64):
        super().__init__()
        if linear.weight.dtype != torch.float32 or linear.weight.device.type != "cpu":
            raise ValueError("MKL packing needs float32 weights on the CPU")
        self.weight = linear.weight  # shared, not copied: the plain path and tied embeddings still use it
        self.bias = linear.bias
        self.rows, self.min_rows, self.max_rows = rows, min_rows, max_rows
        self._pack()

    def _pack(self) -> None:
        # An opaque MKL tensor: not a buffer (no state_dict, no .to()), rebuilt after copy or unpickling.
        self.packed_weight = torch.ops.mkl._mkl_reorder_linear_weight(self.weight.detach(), self.rows)

    def __getstate__(self) -> dict:
        state = super().__getstate__().copy()
        state.pop("packed_weight", None)
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._pack()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] -> [..., F]"""
        num_rows = x.numel() // x.shape[-1] if x.dim() else 0
        if not (self.min_rows <= num_rows <= self.max_rows) or x.dtype != torch.float32:
            return F.linear(x, self.weight, self.bias)
        flat = x.reshape(num_rows, x.shape[-1])
        if num_rows <= self.rows:
            out = self._packed(flat)
        else:
            out = torch.cat([self._packed(flat[start:start + self.rows]) for start in range(0, num_rows, self.rows)])
        return out.view(*x.shape[:-1], self.out_features)

    def _packed(self, rows: torch.Tensor) -> torch.Tensor:
        """rows [n <= self.rows, K] -> [n, F]"""
        num_rows = rows.shape[0]
        if num_rows < self.rows:
            padded = rows.new_zeros(self.rows, rows.shape[1])
            padded[:num_rows] = rows
            rows = padded
        out = torch.ops.mkl._mkl_linear(rows.contiguous(), self.packed_weight, self.weight, self.bias, self.rows)
        return out[:num_rows]

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rows={self.rows} ({self.min_rows}..{self.max_rows})"


def pack_linears(model: nn.Module, rows: int = 32, min_rows: int = 8, max_rows: int = 64) -> int:
    """Replace every fp32 CPU nn.Linear in `model` by an MklPackedLinear, in place; returns how many
    (0 where torch has no MKL, or the model is not fp32 on the CPU)."""
    if not mkl_packing_available():
        return 0
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and child.weight.dtype == torch.float32 and \
                    child.weight.device.type == "cpu":
                setattr(parent, name, MklPackedLinear(child, rows, min_rows, max_rows))
                replaced += 1
    return replaced
