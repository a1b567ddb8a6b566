# N=out features, K=in features, KB=K/32 quant blocks, P=ceil(N/32) column panels, M=rows of the input
"""Weight-only block-quantized linears (GGUF Q4_0 / Q4_1 / Q8_0) on the CPU: the records, the panel packing the
native kernel reads, the torch twin (`dequantize`) and the call into `cpu_quant_linear.c`.

Why: a decode step multiplies a few rows by every weight, so it is bound by the bytes of weights it reads. The
GGUF file already holds them as 32-weight blocks of 4 or 8 bits; reading those (4.5-8.5 bits a weight) instead of
the fp32 copy the loader makes (32 bits) is 4-7x fewer bytes. The kernel dequantizes exactly: each weight it
multiplies by equals the loader's fp32 value bit for bit (d * q is exact in fp32 for an fp16 d and q < 2^8, and
the one rounding of + m is the one numpy makes), so only the summation order differs from an fp32 GEMM.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from kernels.cpu_native import native_kernels

QBLOCK = 32  # weights per GGUF block, along K
PANEL = 32  # output columns per panel of the packed layout
BLOCK_QUANT_TYPES = ("Q4_0", "Q4_1", "Q8_0")
_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}  # fp16 d [, fp16 m], then the quants
_STATUS_BAD_FORMAT = 1  # STATUS_BAD_FORMAT in the C source


@dataclass(frozen=True)
class BlockQuantRows:
    """One weight [N, K] in GGUF's blocks, rows in output order: w[n, k] = scales[n, k/32] * quants[n, k] + mins[n, k/32]."""

    kind: Literal["q4", "q8"]
    quants: torch.Tensor  # [N, K] uint8 0..15 (q4) or int8 (q8)
    scales: torch.Tensor  # [N, KB] float32 (from fp16)
    mins: torch.Tensor | None  # [N, KB] float32 (q4; Q4_0's is -8 d), None for q8

    @staticmethod
    def from_gguf(type_name: str, data: np.ndarray, out_features: int, in_features: int) -> "BlockQuantRows":
        """data: the tensor's raw blocks as stored in the file (any shape; N * K / 32 blocks)."""
        if type_name not in BLOCK_QUANT_TYPES:
            raise ValueError(f"{type_name} is not a 32-weight block type ({', '.join(BLOCK_QUANT_TYPES)})")
        if in_features % QBLOCK:
            raise ValueError(f"in_features {in_features} is not a multiple of {QBLOCK}")
        num_blocks = in_features // QBLOCK
        blocks = np.ascontiguousarray(data, dtype=np.uint8).reshape(out_features, num_blocks, _BLOCK_BYTES[type_name])
        scales = torch.from_numpy(blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32))
        if type_name == "Q8_0":
            quants = torch.from_numpy(blocks[..., 2:].copy().view(np.int8)).reshape(out_features, in_features)
            return BlockQuantRows("q8", quants, scales, None)
        packed = blocks[..., 4:] if type_name == "Q4_1" else blocks[..., 2:]  # [N, KB, 16]: k = j (low), j + 16 (high)
        quants = torch.from_numpy(np.concatenate([packed & 15, packed >> 4], axis=-1)).reshape(out_features, in_features)
        if type_name == "Q4_1":
            mins = torch.from_numpy(blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32))
        else:
            mins = scales * -8.0  # Q4_0: w = d (q - 8); d q - 8 d is the same float (both terms exact)
        return BlockQuantRows("q4", quants, scales, mins)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.quants.shape)

    def map_rows(self, fn) -> "BlockQuantRows":
        """The same weight with fn applied to every per-row array (a row permutation, a slice)."""
        return BlockQuantRows(self.kind, fn(self.quants), fn(self.scales), None if self.mins is None else fn(self.mins))

    @staticmethod
    def concat(parts: list["BlockQuantRows"]) -> "BlockQuantRows":
        """Stack weights along N (fused q/k/v or gate/up); all parts must share a kind and K."""
        kinds = {part.kind for part in parts}
        if len(kinds) != 1 or len({part.shape[1] for part in parts}) != 1:
            raise ValueError("only weights of one block kind and one in_features can be fused")
        mins = None if parts[0].mins is None else torch.cat([part.mins for part in parts])
        return BlockQuantRows(parts[0].kind, torch.cat([part.quants for part in parts]),
                              torch.cat([part.scales for part in parts]), mins)

    def dequantize(self) -> torch.Tensor:
        """[N, K] float32, the same values the loader's gguf dequantizer gives."""
        out_features, in_features = self.shape
        weight = self.quants.float().view(out_features, -1, QBLOCK) * self.scales.unsqueeze(-1)
        if self.mins is not None:
            weight = weight + self.mins.unsqueeze(-1)
        return weight.view(out_features, in_features)


@dataclass(frozen=True)
class PackedBlockWeight:
    """The kernel's layout (see cpu_quant_linear.c): per 32-column panel and quant block, the 32 k-rows of 32 columns."""

    kind: Literal["q4", "q8"]
    out_features: int
    in_features: int
    quants: torch.Tensor  # q4: [P, KB, 32, 16] uint8 (column j low nibble, j + 16 high); q8: [P, KB, 32, 32] int8
    scales: torch.Tensor  # [P, KB, 32] float32
    mins: torch.Tensor | None  # [P, KB, 32] float32 (q4)

    @staticmethod
    def pack(rows: BlockQuantRows) -> "PackedBlockWeight":
        out_features, in_features = rows.shape
        num_panels, num_blocks = -(-out_features // PANEL), in_features // QBLOCK
        padding = num_panels * PANEL - out_features  # zero scales and mins: the padded columns are 0, never written

        def panels(per_block: torch.Tensor) -> torch.Tensor:  # [N, KB] -> [P, KB, 32]
            padded = torch.nn.functional.pad(per_block, (0, 0, 0, padding))
            return padded.view(num_panels, PANEL, num_blocks).permute(0, 2, 1).contiguous()

        quants = torch.nn.functional.pad(rows.quants, (0, 0, 0, padding))
        quants = quants.view(num_panels, PANEL, num_blocks, QBLOCK).permute(0, 2, 3, 1)  # [P, KB, k, column]
        if rows.kind == "q4":
            quants = quants[..., :16] | (quants[..., 16:] << 4)
        return PackedBlockWeight(rows.kind, out_features, in_features, quants.contiguous(), panels(rows.scales),
                                 None if rows.mins is None else panels(rows.mins))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.quants, self.scales, self.mins) if t is not None)

    def dequantize(self) -> torch.Tensor:
        """[N, K] float32: the torch twin of what the kernel multiplies by."""
        if self.kind == "q4":
            quants = torch.cat([self.quants & 15, self.quants >> 4], dim=-1)
        else:
            quants = self.quants
        weight = quants.float() * self.scales.unsqueeze(2)  # [P, KB, k, column]
        if self.mins is not None:
            weight = weight + self.mins.unsqueeze(2)
        weight = weight.permute(0, 3, 1, 2).reshape(-1, self.in_features)  # [P * 32, K]
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
        4 if weight.kind == "q4" else 8, weight.quants.data_ptr(), weight.scales.data_ptr(),
        None if weight.mins is None else weight.mins.data_ptr(), None if bias is None else bias.data_ptr(),
        rows.data_ptr(), out.data_ptr(), rows.shape[0], weight.in_features, weight.out_features,
        torch.get_num_threads())
    if status:
        raise ValueError(f"quant_linear_f32 refused its arguments (status {status}): kind {weight.kind}, "
                         f"in_features {weight.in_features}")
    return out.view(*x.shape[:-1], weight.out_features)
