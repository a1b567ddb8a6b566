"""SidePlan: the fixed per-head map and code layout that encode one side (K or V) of one layer.

Built from a bit width per *original* channel (uniform for TurboQuant, +1 on outlier channels for fractional
TurboQuant, allocated for Block-GTQ keys) and an
optional calibrated per-channel center and spread:

    y = R @ P @ diag(1 / sigma) @ (x - center)

* ``center`` — subtracting a per-channel mean is exact for attention (q.center shifts every logit of a
  query equally; for values, the probabilities sum to 1) and removes the large DC component that RoPE
  leaves in low-frequency key channels.
* ``sigma`` — puts every channel on the same scale so equal bits mean equal error.
* ``P`` — sorts channels by bit width, so each width is one contiguous group.
* ``R`` — a random rotation inside each group (randomised Hadamard for power-of-two widths, a seeded
  Haar-random orthogonal matrix otherwise): it spreads outliers so the Gaussian codebook fits.
* ``qjl_projection`` — optional (keys only): TurboQuant-prod's 1-bit QJL sketch of the codes' residual, D sign
  bits and one fp16 norm per token and head on top of the codes (kernels/qjl.py).
* Each width group is its own TurboQuant vector with its own per-token scale. One scale shared by all
  widths was measured to be much worse (+32% perplexity vs +1.3% at 4 bits on SmolLM2): a rotation only
  inside a group does not spread the head's energy evenly over the groups, so a shared scale leaves
  each group's codebook badly matched.

# Hkv=KV heads, D=head dim
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from kernels.kv_quant import CodeLayout
from kernels.qjl import qjl_num_bytes, qjl_projection
from workers.kv.codebooks import codebook_tables


@dataclass(frozen=True)
class SidePlan:
    transform: torch.Tensor  # [Hkv, D, D] y = transform @ (x - center)
    inverse: torch.Tensor  # [Hkv, D, D] x = center + inverse @ y
    center: torch.Tensor  # [Hkv, D]
    layout: CodeLayout
    qjl_projection: torch.Tensor | None = None  # [Hkv, D, D] Gaussian, for the QJL residual (keys only)

    @property
    def bytes_per_token(self) -> int:
        """Code bytes plus one fp16 scale per group (and the QJL sign bytes and fp16 norm), for all KV heads."""
        num_kv_heads, head_dim = self.layout.bits.shape
        qjl = qjl_num_bytes(head_dim) + 2 if self.qjl_projection is not None else 0
        return num_kv_heads * (self.layout.num_bytes + 2 * self.layout.num_groups + qjl)


def _hadamard(size: int) -> torch.Tensor:
    matrix = torch.ones(1, 1, dtype=torch.float64)
    while matrix.shape[0] < size:
        matrix = torch.cat([torch.cat([matrix, matrix], 1), torch.cat([matrix, -matrix], 1)], 0)
    return matrix / size**0.5


@functools.lru_cache(maxsize=None)
def _haar_orthogonal(size: int) -> torch.Tensor:
    """One seeded Haar-random orthogonal matrix per size (a QR costs ms; plans need thousands of rotations)."""
    gaussian = torch.randn(size, size, generator=torch.Generator().manual_seed(size), dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    return q * torch.sign(torch.diagonal(r))[None, :]


def random_rotation(size: int, generator: torch.Generator) -> torch.Tensor:
    """A [size, size] orthogonal float64 matrix: a fixed orthogonal base (Hadamard when size is a power of two,
    else a Haar-random matrix), randomised per use by sign flips of its columns."""
    signs = torch.randint(0, 2, (size,), generator=generator, dtype=torch.float64) * 2 - 1
    base = _hadamard(size) if size & (size - 1) == 0 else _haar_orthogonal(size)
    return base * signs[None, :]


def build_side_plan(bits: torch.Tensor, *, center: torch.Tensor | None = None, sigma: torch.Tensor | None = None,
                    rotate: bool = True, codebook: str = "gaussian", scale_mode: str = "norm", seed: int = 0,
                    qjl: bool = False, device: torch.device = torch.device("cpu")) -> SidePlan:
    """bits [Hkv, D] int per original channel (1..8) -> the plan. Every head gets its own rotation.

    ``qjl`` adds a QJL residual with its own seeded Gaussian projection (seed + 1_000_003: never the rotation's).
    """
    num_kv_heads, head_dim = bits.shape
    bits = bits.to(torch.int64).cpu()
    center = torch.zeros(num_kv_heads, head_dim) if center is None else center.float().cpu()
    sigma = torch.ones(num_kv_heads, head_dim) if sigma is None else sigma.float().cpu().clamp_min(1e-6)
    generator = torch.Generator().manual_seed(seed)
    transforms, inverses, sorted_bits, groups = [], [], [], []
    for head in range(num_kv_heads):
        # Stable sort, widest first: P maps transformed slot j to original channel order[j].
        order = torch.sort(-bits[head], stable=True).indices
        head_bits = bits[head, order]
        widths = head_bits.unique(sorted=True).flip(0).tolist()  # widest first, like the channels
        groups.append(torch.tensor([widths.index(width) for width in head_bits.tolist()]))
        rotation = torch.eye(head_dim, dtype=torch.float64)
        if rotate:
            for width in head_bits.unique().tolist():
                members = (head_bits == width).nonzero().flatten()
                start, size = int(members[0]), members.numel()
                rotation[start:start + size, start:start + size] = random_rotation(size, generator)
        scale = sigma[head].double()
        # R @ P is R with its columns moved to the original channel order (P: slot j <- channel order[j]).
        rotated_permuted = rotation[:, torch.argsort(order)]
        transforms.append(rotated_permuted / scale[None, :])
        inverses.append(scale[:, None] * rotated_permuted.T)
        sorted_bits.append(head_bits)
    sorted_bits = torch.stack(sorted_bits)  # [Hkv, D]
    bitpos = torch.cumsum(sorted_bits, dim=1) - sorted_bits
    # Every head of a layer gets the same byte width, so pages stay one dense tensor.
    num_bytes = int(-(-sorted_bits.sum(dim=1).max() // 8))
    levels, thresholds = codebook_tables(codebook, device)
    groups = torch.stack(groups)
    layout = CodeLayout(bits=sorted_bits.to(torch.int32).to(device), bitpos=bitpos.to(torch.int32).to(device),
                        group=groups.to(torch.int32).to(device), num_groups=int(groups.max()) + 1, codebook=levels, boundaries=thresholds, num_bytes=num_bytes, scale_mode=scale_mode)
    return SidePlan(transform=torch.stack(transforms).float().to(device),
                    inverse=torch.stack(inverses).float().to(device),
                    center=center.to(device), layout=layout,
                    qjl_projection=qjl_projection(num_kv_heads, head_dim, seed + 1_000_003).to(device) if qjl else None)
