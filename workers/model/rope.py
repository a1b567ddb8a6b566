"""Rotary position embeddings (HF "rotate_half" layout), with linear and llama3 frequency scaling.

# T=tokens, H=heads, D=head dim, F=D/2 rotary frequencies
"""

from __future__ import annotations

import math

import torch

from workers.model.config import ModelConfig


def rope_inv_freq(config: ModelConfig, freq_factors: torch.Tensor | None = None) -> torch.Tensor:
    """[F] inverse frequencies after scaling; computed in float64 then cast, matching HF's float32 result."""
    head_dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    scaling = config.rope_scaling
    if freq_factors is not None:
        # GGUF llama3 checkpoints carry the scaled divisors as a tensor (rope_freqs.weight).
        return inv_freq / freq_factors.float()
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    if scaling.rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, scaling.factor, scaling.low_freq_factor, scaling.high_freq_factor,
                                scaling.original_max_position_embeddings)
    return inv_freq


def _llama3_inv_freq(inv_freq: torch.Tensor, factor: float, low_freq_factor: float, high_freq_factor: float,
                     original_max_position_embeddings: int) -> torch.Tensor:
    low_freq_wavelen = original_max_position_embeddings / low_freq_factor
    high_freq_wavelen = original_max_position_embeddings / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths (low frequencies) are slowed by `factor`; short ones untouched; a smooth ramp between.
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (original_max_position_embeddings / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding:
    """Precomputed cos/sin tables indexed by absolute position; positions never change after a token is cached."""

    def __init__(self, inv_freq: torch.Tensor, max_positions: int, dtype: torch.dtype, device: torch.device):
        positions = torch.arange(max_positions, dtype=torch.float32)
        freqs = torch.outer(positions, inv_freq.float())  # [P, F]
        # HF computes cos/sin in fp32 then casts to the activation dtype.
        self.cos = freqs.cos().to(dtype=dtype, device=device)  # [P, F]
        self.sin = freqs.sin().to(dtype=dtype, device=device)  # [P, F]
        self.max_positions = max_positions

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] -> (cos, sin) [T, F]; done once per step and shared by every layer (applied by
        kernels.fused_ops.rope_)."""
        return self.cos[positions], self.sin[positions]
