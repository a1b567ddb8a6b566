# N=out features, K=in features, G=weights per scale along K (32 or 16), KG=K/G scale groups, KB=K/32 quant blocks,
# P=ceil(N/32) column panels, M=rows of the input
"""Weight-only block-quantized linears on the CPU, from GGUF's block types: the records, the panel packing the
native kernel reads, the torch twin (`dequantize`) and the call into `cpu_quant_linear.c`.

Why: a decode step multiplies a few rows by every weight, so it is bound by the bytes of weights it reads. The
GGUF file already holds them as small integers with a scale per block; reading those (6-12 bits a weight with our
fp32 scales) instead of the fp32 copy the loader makes (32 bits) is 3-5x fewer bytes.

Two kernel formats hold every type we read, exactly (the same fp32 value gguf-py's dequantizer gives, bit for bit):
  q4: uint8 0..15 with a scale and a min per 32 weights: Q4_0 (min -8 d), Q4_1, Q4_K (scale d sc_j, min -dmin m_j)
  q8: int8 with a scale per 32 (Q8_0, Q5_0 as q - 16) or per 16 weights (Q6_K: q - 32, scale d sc_j), mins optional
Exact because scale * q is exact in fp32 for each: an fp16 d (11 significant bits) times a sub-block scale (6 bits
for Q4_K, 8 for Q6_K) times q (4 to 8 bits) needs at most 23 bits; so the kernel's q * scale + min rounds once,
where numpy's d * q - dm rounds once. Only the summation order of the matmul differs from an fp32 GEMM.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import numpy as np
import torch

from kernels.cpu_native import native_kernels

QBLOCK = 32  # weights per 32-weight block along K: the kernel's k-block (K must be a multiple)
PANEL = 32  # output columns per panel of the packed layout
_STATUS_BAD_FORMAT = 1  # STATUS_BAD_FORMAT in the C source


def _fp16(raw: np.ndarray) -> np.ndarray:
    """[..., 2] bytes -> [...] float32 (an fp16 read exactly)"""
    return np.ascontiguousarray(raw).view(np.float16)[..., 0].astype(np.float32)


# Each decoder: the tensor's blocks [N, B, bytes] -> (quants [N, B, weights per block], scales [N, B, groups per
# block], mins [N, B, groups per block] or None), as numpy arrays in gguf-py's weight order (gguf/quants.py).
def _q4_0(blocks):
    d, qs = _fp16(blocks[..., 0:2]), blocks[..., 2:]  # qs [N, B, 16]: weight j (low nibble), j + 16 (high)
    return np.concatenate([qs & 15, qs >> 4], axis=-1), d[..., None], (d * -8.0)[..., None]  # d q - 8 d: exact


def _q4_1(blocks):
    d, m, qs = _fp16(blocks[..., 0:2]), _fp16(blocks[..., 2:4]), blocks[..., 4:]
    return np.concatenate([qs & 15, qs >> 4], axis=-1), d[..., None], m[..., None]


def _q8_0(blocks):
    return np.ascontiguousarray(blocks[..., 2:]).view(np.int8), _fp16(blocks[..., 0:2])[..., None], None


def _q5_0(blocks):
    """d (fp16), qh (a little-endian uint32: bit j is weight j's 5th bit), qs (weight j low nibble, j + 16 high);
    w = d (q - 16)."""
    d, qh, qs = _fp16(blocks[..., 0:2]), blocks[..., 2:6], blocks[..., 6:]
    high = np.unpackbits(np.ascontiguousarray(qh), axis=-1, bitorder="little")  # [N, B, 32]
    q = np.concatenate([qs & 15, qs >> 4], axis=-1) | (high << 4)
    return (q.astype(np.int8) - np.int8(16)), d[..., None], None


def _q4_k(blocks):
    """256 weights: d, dmin (fp16), 12 bytes of eight 6-bit scales and mins, qs [4, 32] (sub-block 2c: the low
    nibbles of qs[c], 2c + 1: the high ones); w = (d sc_j) q - dmin m_j."""
    d, dmin, packed, qs = _fp16(blocks[..., 0:2]), _fp16(blocks[..., 2:4]), blocks[..., 4:16], blocks[..., 16:]
    low, high, mixed = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    sc = np.concatenate([low & 0x3F, (mixed & 0x0F) | ((low >> 2) & 0x30)], axis=-1)  # [N, B, 8]
    m = np.concatenate([high & 0x3F, (mixed >> 4) | ((high >> 2) & 0x30)], axis=-1)
    qs = qs.reshape(*qs.shape[:-1], 4, 1, 32)
    q = np.concatenate([qs & 15, qs >> 4], axis=-2).reshape(*qs.shape[:-3], 256)
    return q, d[..., None] * sc.astype(np.float32), -(dmin[..., None] * m.astype(np.float32))


def _q6_k(blocks):
    """256 weights: ql [2, 64] (low 4 bits: per half, weights 0-63 low nibbles, 64-127 high), qh [2, 32] (high 2 bits:
    per half, weight 32 s + b at bits 2 s of byte b), sixteen int8 scales, d (fp16); w = (d sc_j) (q - 32)."""
    ql, qh = blocks[..., 0:128], blocks[..., 128:192]
    sc, d = np.ascontiguousarray(blocks[..., 192:208]).view(np.int8), _fp16(blocks[..., 208:210])
    ql = ql.reshape(*ql.shape[:-1], 2, 1, 64)
    low = np.concatenate([ql & 15, ql >> 4], axis=-2).reshape(*ql.shape[:-3], 256)
    qh = qh.reshape(*qh.shape[:-1], 2, 1, 32)
    high = np.concatenate([(qh >> shift) & 3 for shift in (0, 2, 4, 6)], axis=-2).reshape(*qh.shape[:-3], 256)
    q = (low | (high << 4)).astype(np.int8) - np.int8(32)
    return q, d[..., None] * sc.astype(np.float32), None


@dataclass(frozen=True)
class _GGUFType:
    block_weights: int  # weights per block, along K
    block_bytes: int
    kind: Literal["q4", "q8"]
    group: int  # weights per scale
    decode: Callable


GGUF_BLOCK_TYPES = {
    "Q4_0": _GGUFType(32, 18, "q4", 32, _q4_0),
    "Q4_1": _GGUFType(32, 20, "q4", 32, _q4_1),
    "Q8_0": _GGUFType(32, 34, "q8", 32, _q8_0),
    "Q5_0": _GGUFType(32, 22, "q8", 32, _q5_0),
    "Q4_K": _GGUFType(256, 144, "q4", 32, _q4_k),
    "Q6_K": _GGUFType(256, 210, "q8", 16, _q6_k),
}
BLOCK_QUANT_TYPES = tuple(GGUF_BLOCK_TYPES)


@dataclass(frozen=True)
class BlockQuantRows:
    """One weight [N, K] in rows of output order: w[n, k] = scales[n, k / G] * quants[n, k] (+ mins[n, k / G]),
    G = K / scales.shape[1] weights per scale (32, or 16 for Q6_K)."""

    kind: Literal["q4", "q8"]
    quants: torch.Tensor  # [N, K] uint8 0..15 (q4) or int8 (q8)
    scales: torch.Tensor  # [N, KG] float32
    mins: torch.Tensor | None  # [N, KG] float32; required for q4 (Q4_0's is -8 d), optional for q8

    def __post_init__(self):
        if self.kind == "q4" and self.mins is None:
            raise ValueError("q4 weights need mins")
        if self.group not in (16, 32) or self.shape[1] % QBLOCK:
            raise ValueError(f"{self.scales.shape[1]} scales per row of {self.shape[1]} weights: the kernel takes "
                             f"one per 32 or 16 weights, rows of a multiple of {QBLOCK}")

    @staticmethod
    def from_gguf(type_name: str, data: np.ndarray, out_features: int, in_features: int) -> "BlockQuantRows":
        """data: the tensor's raw blocks as stored in the file (any shape; N * K / block weights blocks)."""
        if type_name not in GGUF_BLOCK_TYPES:
            raise ValueError(f"{type_name} is not a block type the kernel reads ({', '.join(BLOCK_QUANT_TYPES)})")
        spec = GGUF_BLOCK_TYPES[type_name]
        if in_features % spec.block_weights:
            raise ValueError(f"in_features {in_features} is not a multiple of {type_name}'s {spec.block_weights}")
        num_blocks = in_features // spec.block_weights
        blocks = np.ascontiguousarray(data, dtype=np.uint8).reshape(out_features, num_blocks, spec.block_bytes)
        quants, scales, mins = spec.decode(blocks)

        def per_row(array: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(array)).reshape(out_features, -1)

        return BlockQuantRows(spec.kind, per_row(quants), per_row(scales), None if mins is None else per_row(mins))

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.quants.shape)

    @property
    def group(self) -> int:
        return self.shape[1] // max(1, self.scales.shape[1])

    def map_rows(self, fn) -> "BlockQuantRows":
        """The same weight with fn applied to every per-row array (a row permutation, a slice)."""
        return BlockQuantRows(self.kind, fn(self.quants), fn(self.scales), None if self.mins is None else fn(self.mins))

    def widen(self, kind: Literal["q4", "q8"], group: int, with_mins: bool) -> "BlockQuantRows":
        """The same weights in a format at least as wide (q4 -> q8, a scale per 32 -> per 16, zero mins added);
        dequantize() is unchanged (s q + 0 is s q)."""
        if (self.kind == "q8" and kind == "q4") or group > self.group or (self.mins is not None and not with_mins):
            raise ValueError(f"{self.kind}/{self.group}{'/mins' if self.mins is not None else ''} cannot be "
                             f"widened to {kind}/{group}{'/mins' if with_mins else ''}")
        quants = self.quants.to(torch.int8) if kind != self.kind else self.quants
        scales, mins = self.scales, self.mins
        if with_mins and mins is None:
            mins = torch.zeros_like(scales)
        if group != self.group:
            scales = scales.repeat_interleave(self.group // group, dim=1)
            mins = None if mins is None else mins.repeat_interleave(self.group // group, dim=1)
        return BlockQuantRows(kind, quants, scales, mins)

    @staticmethod
    def concat(parts: list["BlockQuantRows"]) -> "BlockQuantRows":
        """Stack weights along N (fused q/k/v or gate/up). Parts of different formats are first widened to the
        narrowest one that holds each exactly (Qwen2.5-1.5B: Q4_K q/k with a Q6_K v -> q8 per 16 with mins)."""
        if len({part.shape[1] for part in parts}) != 1:
            raise ValueError("only weights of one in_features can be fused")
        kind = "q8" if any(part.kind == "q8" for part in parts) else "q4"
        group = min(part.group for part in parts)
        with_mins = any(part.mins is not None for part in parts)
        parts = [part.widen(kind, group, with_mins) for part in parts]
        return BlockQuantRows(kind, torch.cat([part.quants for part in parts]),
                              torch.cat([part.scales for part in parts]),
                              torch.cat([part.mins for part in parts]) if with_mins else None)

    def dequantize(self) -> torch.Tensor:
        """[N, K] float32, the same values the loader's gguf dequantizer gives."""
        out_features, in_features = self.shape
        weight = self.quants.float().view(out_features, -1, self.group) * self.scales.unsqueeze(-1)
        if self.mins is not None:
            weight = weight + self.mins.unsqueeze(-1)
        return weight.view(out_features, in_features)


@dataclass(frozen=True)
class PackedBlockWeight:
    """The kernel's layout (see cpu_quant_linear.c): per 32-column panel, its K k-rows of 32 columns, and its
    scales (and mins) per group of G k-rows."""

    kind: Literal["q4", "q8"]
    out_features: int
    in_features: int
    quants: torch.Tensor  # q4: [P, KB, 32, 16] uint8 (column j low nibble, j + 16 high); q8: [P, KB, 32, 32] int8
    scales: torch.Tensor  # [P, KG, 32] float32
    mins: torch.Tensor | None  # [P, KG, 32] float32 (q4; optional for q8)

    @staticmethod
    def pack(rows: BlockQuantRows) -> "PackedBlockWeight":
        out_features, in_features = rows.shape
        num_panels, num_blocks = -(-out_features // PANEL), in_features // QBLOCK
        padding = num_panels * PANEL - out_features  # zero scales and mins: the padded columns are 0, never written

        def panels(per_group: torch.Tensor) -> torch.Tensor:  # [N, KG] -> [P, KG, 32]
            padded = torch.nn.functional.pad(per_group, (0, 0, 0, padding))
            return padded.view(num_panels, PANEL, -1).permute(0, 2, 1).contiguous()

        quants = torch.nn.functional.pad(rows.quants, (0, 0, 0, padding))
        quants = quants.view(num_panels, PANEL, num_blocks, QBLOCK).permute(0, 2, 3, 1)  # [P, KB, k, column]
        if rows.kind == "q4":
            quants = quants[..., :16] | (quants[..., 16:] << 4)
        return PackedBlockWeight(rows.kind, out_features, in_features, quants.contiguous(), panels(rows.scales),
                                 None if rows.mins is None else panels(rows.mins))

    @property
    def group(self) -> int:
        return self.in_features // self.scales.shape[1]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.quants, self.scales, self.mins) if t is not None)

    def dequantize(self) -> torch.Tensor:
        """[N, K] float32: the torch twin of what the kernel multiplies by."""
        if self.kind == "q4":
            quants = torch.cat([self.quants & 15, self.quants >> 4], dim=-1)
        else:
            quants = self.quants
        quants = quants.view(-1, self.in_features, PANEL)  # [P, K, column]
        weight = quants.float() * self.scales.repeat_interleave(self.group, dim=1)
        if self.mins is not None:
            weight = weight + self.mins.repeat_interleave(self.group, dim=1)
        weight = weight.permute(0, 2, 1).reshape(-1, self.in_features)  # [P * 32, K]
        return weight[:self.out_features]


def reference_block_quant_linear(x: torch.Tensor, weight: PackedBlockWeight, bias: torch.Tensor | None = None
                                 ) -> torch.Tensor:
    """x [..., K] -> [..., N]: the slow twin (dequantize, then torch's fp32 GEMM)."""
    return torch.nn.functional.linear(x, weight.dequantize(), bias)


def native_block_quant_linear(x: torch.Tensor, weight: PackedBlockWeight, bias: torch.Tensor | None = None
                              ) -> torch.Tensor | None:
    """x [..., K] float32 on the CPU -> [..., N]; None where the native kernel does not apply (the caller then takes
    its fp32 path)."""
    library = native_kernels()
    if library is None or x.device.type != "cpu" or x.dtype != torch.float32 or x.shape[-1] != weight.in_features:
        return None
    if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
        return None
    if bias is not None and bias.shape != (weight.out_features,):
        raise ValueError(f"bias of shape {tuple(bias.shape)} for {weight.out_features} out features")
    rows = x.reshape(-1, weight.in_features).contiguous()
    out = torch.empty(rows.shape[0], weight.out_features, dtype=torch.float32)
    status = library.quant_linear_f32(
        4 if weight.kind == "q4" else 8, weight.group, weight.quants.data_ptr(), weight.scales.data_ptr(),
        None if weight.mins is None else weight.mins.data_ptr(), None if bias is None else bias.data_ptr(),
        rows.data_ptr(), out.data_ptr(), rows.shape[0], weight.in_features, weight.out_features,
        torch.get_num_threads())
    if status:
        raise ValueError(f"quant_linear_f32 refused its arguments (status {status}): kind {weight.kind}, "
                         f"group {weight.group}, in_features {weight.in_features}")
    return out.view(*x.shape[:-1], weight.out_features)
