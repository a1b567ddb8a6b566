"""Scalar codebooks for encoded KV: Lloyd-Max levels for a unit Gaussian, and int8's uniform grid.

After a random rotation each coordinate of a head vector, rescaled by sqrt(D)/|x|, is close to N(0, 1)
(TurboQuant), so the MSE-optimal b-bit scalar quantizer is the Lloyd-Max quantizer of N(0, 1): levels
at the conditional means of their cells, thresholds halfway between levels. Computed here by Lloyd's
iteration in float64 (closed-form Gaussian moments), not copied from a table.

# K=levels (2**bits)
"""

from __future__ import annotations

import functools
import math

import torch

MAX_BITS = 8


_NORMAL = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))


def _cells(levels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The quantizer's cells for ascending levels [K]: edges [K+1] (midpoints, +-inf), pdf and cdf at the edges."""
    infinity = torch.tensor([math.inf], dtype=torch.float64)
    edges = torch.cat([-infinity, (levels[1:] + levels[:-1]) / 2, infinity])
    pdf = torch.nan_to_num(torch.exp(-0.5 * edges**2) / math.sqrt(2 * math.pi), nan=0.0)
    return edges, pdf, _NORMAL.cdf(edges)


@functools.lru_cache(maxsize=None)
def lloyd_max_gaussian(bits: int, iterations: int = 2000) -> torch.Tensor:
    """The 2**bits MSE-optimal levels for N(0, 1), ascending, float64 [K]."""
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be in 1..{MAX_BITS}, got {bits}")
    num_levels = 2**bits
    levels = _NORMAL.icdf((torch.arange(num_levels, dtype=torch.float64) + 0.5) / num_levels)
    for _ in range(iterations):
        _, pdf, cdf = _cells(levels)
        new_levels = (pdf[:-1] - pdf[1:]) / (cdf[1:] - cdf[:-1]).clamp_min(1e-300)  # each cell's conditional mean
        if torch.allclose(new_levels, levels, atol=1e-12, rtol=0):
            return new_levels
        levels = new_levels
    return levels


def gaussian_mse(bits: int) -> float:
    """Expected squared error of the b-bit Lloyd-Max quantizer on N(0, 1) (closed form over the cells)."""
    levels = lloyd_max_gaussian(bits)
    edges, pdf, cdf = _cells(levels)
    finite = torch.where(torch.isinf(edges), torch.zeros_like(edges), edges)
    # E[(X - c)^2 ; a < X < b] = (P + int x^2) - 2c int x + c^2 P, with int x phi = phi(a) - phi(b) and
    # int x^2 phi = P + a phi(a) - b phi(b).
    mass = cdf[1:] - cdf[:-1]
    first = pdf[:-1] - pdf[1:]
    second = mass + finite[:-1] * pdf[:-1] - finite[1:] * pdf[1:]
    return float((second - 2 * levels * first + levels**2 * mass).sum())


@functools.lru_cache(maxsize=None)
def codebook_tables(kind: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (levels [9, 256], thresholds [9, 255]) float32; row b holds the b-bit codebook (+inf padding).

    kind "gaussian": Lloyd-Max levels for N(0, 1); "gaussian_unshrunk": the same cells, levels rescaled to unit
    energy per width (for mixed-width heads). kind "int8": row 8 is the symmetric grid -127..127
    (code 0 = -127), used with absmax scaling. Cached: every plan of a codec shares the same (read-only) tables.
    """
    levels = torch.zeros(MAX_BITS + 1, 256, dtype=torch.float32)
    thresholds = torch.full((MAX_BITS + 1, 255), math.inf, dtype=torch.float32)
    if kind in ("gaussian", "gaussian_unshrunk"):
        for bits in range(1, MAX_BITS + 1):
            row = lloyd_max_gaussian(bits).float()
            thresholds[bits, : row.numel() - 1] = (row[1:] + row[:-1]) / 2
            if kind == "gaussian_unshrunk":
                # Centroids shrink: E[level^2] = 1 - mse(b). Undoing it per width keeps every width's decoded
                # energy equal, so one per-token norm correction is fair to wide and narrow channels alike.
                row = row / math.sqrt(1.0 - gaussian_mse(bits))
            levels[bits, : row.numel()] = row
    elif kind == "int8":
        row = torch.arange(-127, 128, dtype=torch.float32)
        levels[8, : row.numel()] = row
        thresholds[8, : row.numel() - 1] = (row[1:] + row[:-1]) / 2
    else:
        raise ValueError(f"unknown codebook kind {kind!r}")
    return levels.to(device), thresholds.to(device)
