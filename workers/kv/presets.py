"""Codec names -> codecs: the one place a config string (``tq-k4v3``, ``gtq-3.0``, ``int8``...) becomes a codec.

* ``auto`` / ``float32`` / ``float16`` / ``bfloat16`` (``fp16``, ``bf16``) — identity pages.
* ``int8`` — per-token absmax int8 (no rotation), the simple baseline.
* ``tq-k{b}v{b}`` — TurboQuant-MSE: randomised-Hadamard rotation per head, Lloyd-Max Gaussian codebooks,
  norm-corrected fp16 scale; uniform bits for K and V chosen separately (1..8). No calibration.
* ``tq-k{b}.{f}v{b}`` (either side fractional, e.g. ``tq-k3.5v3``) — TurboQuant's outlier channels: per head,
  the round(0.f * D) channels with the largest calibrated RMS get b+1 bits, the rest b, and each set is its own
  TurboQuant instance (own rotation, own scale). Needs a calibration file (for the RMS).
* ``...+qjl`` (e.g. ``tq-k3v4+qjl``) — TurboQuant-prod for keys: the b-bit MSE codes plus a 1-bit QJL sketch of
  their residual (D sign bits and an fp16 norm per token and head), for unbiased q.k estimates (kernels/qjl.py).
* ``gtq-{bits}`` / ``gtq-k{b}v{b}`` — Block-GTQ keys: calibrated centering and normalisation, bits allocated per
  RoPE pair from the calibration scores, rotation inside each width group; high-score pairs get up to 8 bits
  (the keys' outlier channels). Values are TurboQuant as in ``tq-*`` (outlier channels when fractional).
  Needs a calibration file.

A calibrated codec's name carries the calibration digest (``gtq-k3v3@1a2b3c4d.v2``, ``.v2`` the Block-GTQ page format
version) and any uncompressed
layers (``+fp16:0,29``): the tiers compare names at handshake, and the same preset with a different
calibration is a different byte format.
"""

from __future__ import annotations

import re

import torch

from workers.kv.calibration import KVCalibration, allocate_bits
from workers.kv.codecs import FLOAT_DTYPES, IdentityCodec, KVCodec
from workers.kv.quant_codec import QuantCodec
from workers.kv.quant_plan import build_side_plan

_TQ = re.compile(r"^tq-k([1-8](?:\.\d+)?)v([1-8](?:\.\d+)?)(\+qjl)?$")
_GTQ = re.compile(r"^gtq-(?:(\d+(?:\.\d+)?)|k(\d+(?:\.\d+)?)v(\d+(?:\.\d+)?))$")

# Widths Block-GTQ may use. Each width present in a head is a scale group (2 bytes per token), so the set is
# kept small: 3 widths cost at most 6 bytes per token and head on top of the codes. Measured on SmolLM2
# (4 x 1024 tokens, 4 bits, values then also Block-GTQ): {2,4,8} +2.3% at 3.53x, {1,2,4,8} +2.6% at 3.50x, all of
# 1..8 +2.2% at 3.16x. Re-measured with TurboQuant values: {2,3,4,5,6,8}, {2,3,4,6,8} and {1,2,3,4,6,8} lie on
# the same ratio/perplexity curve as {2,4,8} (more widths help 3-bit keys but pay for it in scale bytes).
GTQ_WIDTHS = (2, 4, 8)

PRESETS = ("float16", "bfloat16", "int8", "tq-k8v4", "tq-k4v4", "tq-k4v3", "tq-k3v3", "tq-k2v2", "tq-k3v4+qjl",
           "tq-k3.5v3", "gtq-4.0", "gtq-3.5", "gtq-3.0", "gtq-2.5")


def _fractional(bits: str) -> bool:
    return float(bits) != int(float(bits))


def needs_calibration(name: str) -> bool:
    if match := _TQ.match(name):
        return _fractional(match.group(1)) or _fractional(match.group(2))
    return bool(_GTQ.match(name))


def outlier_bits(rms: torch.Tensor, bits: float) -> torch.Tensor:
    """rms [Hkv, D] -> bits [Hkv, D]: floor(bits) everywhere, +1 on each head's round(frac * D) largest-RMS channels."""
    base = int(bits)
    num_outliers = round((bits - base) * rms.shape[1])
    allocated = torch.full(rms.shape, base, dtype=torch.int32)
    if num_outliers:
        allocated.scatter_(1, rms.topk(num_outliers, dim=1).indices, base + 1)
    return allocated


def _turboquant_bits(bits: float, calibration: KVCalibration | None, side: str, layer: int,
                     shape: tuple[int, int]) -> torch.Tensor:
    """TurboQuant's bits for one side of one layer: uniform, or outlier channels when `bits` is fractional."""
    if bits == int(bits):
        return torch.full(shape, int(bits), dtype=torch.int32)
    # TurboQuant does not center, so a channel's outlier size is its raw RMS, mean included.
    center, sigma = getattr(calibration, f"{side}_center")[layer], getattr(calibration, f"{side}_sigma")[layer]
    return outlier_bits((center ** 2 + sigma ** 2).sqrt(), bits)


def check_codec_name(name: str) -> str:
    """Validate a codec name without building it (config load time); returns it or raises ValueError."""
    if name == "auto" or name in FLOAT_DTYPES or name == "int8":
        return name
    if match := _TQ.match(name):
        for label, bits in (("key bits", match.group(1)), ("value bits", match.group(2))):
            if float(bits) > 8:
                raise ValueError(f"kv codec {name!r}: {label} must be within 1..8, got {bits}")
        return name
    if match := _GTQ.match(name):
        for label, bits in (("bits", match.group(1)), ("key bits", match.group(2)), ("value bits", match.group(3))):
            if bits is not None and not 1.0 <= float(bits) <= 8.0:
                raise ValueError(f"kv codec {name!r}: {label} must be within 1..8, got {bits}")
        return name
    raise ValueError(f"unknown kv codec {name!r}; use auto, float32, float16, bfloat16, int8, tq-k<b>v<b>[+qjl] "
                     f"(b in 1..8, fractional for outlier channels), gtq-<bits> or gtq-k<bits>v<bits> "
                     f"(presets: {', '.join(PRESETS)})")


def make_codec(name: str, *, model_dtype: torch.dtype, num_layers: int, num_kv_heads: int, head_dim: int,
               device: torch.device = torch.device("cpu"), calibration: KVCalibration | None = None,
               exclude_layers: tuple[int, ...] = ()) -> KVCodec:
    """Build the codec `name`; raises ValueError naming what is wrong (unknown name, missing calibration)."""
    check_codec_name(name)
    if name == "auto" or name in FLOAT_DTYPES:
        if exclude_layers:
            raise ValueError("kv_exclude_layers only applies to quantized codecs")
        dtype = model_dtype if name == "auto" else FLOAT_DTYPES[name]
        return IdentityCodec(dtype, num_kv_heads, head_dim, lossless=dtype == model_dtype)
    bad_layers = [layer for layer in exclude_layers if not 0 <= layer < num_layers]
    if bad_layers:
        raise ValueError(f"kv_exclude_layers: layer {bad_layers[0]} is outside 0..{num_layers - 1}")
    shape = (num_kv_heads, head_dim)
    calibrated = needs_calibration(name)
    if calibrated:
        if calibration is None:
            what = "Block-GTQ" if _GTQ.match(name) else "outlier channels"
            raise ValueError(f"kv codec {name!r} ({what}) needs a calibration file (kv_calibration; make one with "
                             f"`tierserve calibrate --out FILE`)")
        calibration.check_shape(num_layers, num_kv_heads, head_dim)
    if name == "int8":
        side = build_side_plan(torch.full(shape, 8), rotate=False, codebook="int8", scale_mode="absmax", device=device)
        side_plans = [(side, side)] * num_layers
    elif match := _TQ.match(name):
        key_bits, value_bits, qjl = float(match.group(1)), float(match.group(2)), bool(match.group(3))
        side_plans = [(build_side_plan(_turboquant_bits(key_bits, calibration, "key", layer, shape), seed=2 * layer,
                                       qjl=qjl, device=device),
                       build_side_plan(_turboquant_bits(value_bits, calibration, "value", layer, shape),
                                       seed=2 * layer + 1, device=device))
                      for layer in range(num_layers)]
        if calibrated:
            name = f"{name}@{calibration.digest()}"
    elif match := _GTQ.match(name):
        key_bits = float(match.group(1) or match.group(2))
        value_bits = float(match.group(1) or match.group(3))
        side_plans = []
        for layer in range(num_layers):
            key_plan = build_side_plan(
                allocate_bits(calibration.key_score[layer], key_bits, rope_pairs=True, widths=GTQ_WIDTHS),
                center=calibration.key_center[layer], sigma=calibration.key_sigma[layer], seed=2 * layer,
                device=device)
            # Block-GTQ is a key method; values stay TurboQuant (outlier channels when fractional). Measured on
            # SmolLM2 (4 x 1024 tokens, 8-bit keys): calibrated allocation for values cost +1.0% at 4 bits and
            # +0.57% at 5, TurboQuant +0.44% and +0.18%.
            value_plan = build_side_plan(_turboquant_bits(value_bits, calibration, "value", layer, shape),
                                         seed=2 * layer + 1, device=device)
            side_plans.append((key_plan, value_plan))
        # ".v2": values became TurboQuant pages (before: calibrated Block-GTQ values) under the same preset
        # names; the tag keeps a tier of either version from accepting the other's pages at handshake.
        name = f"{name}@{calibration.digest()}.v2"
    else:
        raise AssertionError(f"codec name {name!r} passed check_codec_name but has no builder")
    plans = [None if layer in exclude_layers else side_plans[layer] for layer in range(num_layers)]
    if exclude_layers:
        name = f"{name}+fp16:{','.join(str(layer) for layer in sorted(set(exclude_layers)))}"
    return QuantCodec(name, plans, num_kv_heads, head_dim)
