# T=rows (tokens), E=hidden size, I=intermediate size, R=rotated heads, D=head dim, F=D/2, N=rows, V=vocab
"""The decoder's row-wise ops, fused: rms_norm (optionally after the residual add), silu(gate) * up, rotary
embedding in place, and argmax over rows. Each public function runs `cpu_fused.c` for fp32 CPU tensors and its torch
twin (`reference_*`, the formulas Hugging Face uses) everywhere else; the tests hold the two together.

Why: on a decode step the tensors are tiny ([32, 576]) and torch's cost is per op (dispatch, allocation, an OpenMP
region); the fused kernel does each of these in one pass and one call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.cpu_native import native_kernels


def _native_for(*tensors: torch.Tensor):
    """The library when every tensor is a contiguous fp32 CPU tensor, else None."""
    if any(t.device.type != "cpu" or t.dtype != torch.float32 or not t.is_contiguous() for t in tensors):
        return None
    return native_kernels()


def reference_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x, weight.shape, weight, eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
             ) -> torch.Tensor:
    """x [T, E] -> normed [T, E]. With `residual`, first x += residual IN PLACE (x is the residual stream)."""
    if weight.shape != x.shape[-1:] or (residual is not None and residual.shape != x.shape):
        raise ValueError(f"rms_norm: weight {tuple(weight.shape)} / residual "
                         f"{None if residual is None else tuple(residual.shape)} do not fit x {tuple(x.shape)}")
    library = _native_for(x, weight, *(() if residual is None else (residual,)))
    if library is None or x.dim() != 2:
        if residual is not None:
            x.add_(residual)
        return reference_rms_norm(x, weight, eps)
    out = torch.empty_like(x)
    library.rms_norm_f32(x.data_ptr(), None if residual is None else residual.data_ptr(), weight.data_ptr(),
                         out.data_ptr(), x.shape[0], x.shape[1], eps, torch.get_num_threads())
    return out


def reference_silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [T, 2I] (gate, then up) -> [T, I]"""
    library = _native_for(gate_up)
    if library is None or gate_up.dim() != 2:
        return reference_silu_mul(gate_up)
    num_rows, width = gate_up.shape
    out = torch.empty(num_rows, width // 2, dtype=torch.float32)
    library.silu_mul_f32(gate_up.data_ptr(), out.data_ptr(), num_rows, width // 2, torch.get_num_threads())
    return out


def reference_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, R, D], cos/sin [T, F] -> rotated copy (rotate_half layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [T, R, D] in place (x may be a strided view of a fused qkv row: unit stride inside a row's R*D
    values); returns x."""
    num_tokens, num_heads, head_dim = x.shape
    if cos.shape != (num_tokens, head_dim // 2) or sin.shape != cos.shape:
        raise ValueError(f"rope_: cos/sin {tuple(cos.shape)}/{tuple(sin.shape)} do not fit x {tuple(x.shape)}")
    library = _native_for(cos, sin)
    if library is None or x.dtype != torch.float32 or x.device.type != "cpu" or x.stride(2) != 1 or \
            x.stride(1) != head_dim or head_dim % 2:
        x.copy_(reference_rope(x, cos, sin))
        return x
    library.rope_f32(x.data_ptr(), cos.data_ptr(), sin.data_ptr(), num_tokens, num_heads, head_dim, x.stride(0),
                     torch.get_num_threads())
    return x


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """x [N, V] -> [N] int64, the first index of each row's maximum (torch.argmax(dim=-1), NaN included)."""
    library = _native_for(x)
    if library is None or x.dim() != 2 or x.shape[1] == 0:
        return x.argmax(dim=-1)
    index = torch.empty(x.shape[0], dtype=torch.int64)
    if library.argmax_rows_f32(x.data_ptr(), index.data_ptr(), x.shape[0], x.shape[1], torch.get_num_threads()):
        return x.argmax(dim=-1)  # a NaN: torch's rule (NaN is the maximum) decides
    return index
