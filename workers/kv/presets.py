"""Codec names -> codecs: the one place a config string (``tq-k4v3``, ``gtq-3.0``, ``int8``...) becomes a codec.

* ``auto`` / ``float32`` / ``float16`` / ``bfloat16`` (``fp16``, ``bf16``) — identity pages.
* ``int8`` — per-token absmax int8 (no rotation), the simple baseline.
* ``tq-k{b}v{b}`` — TurboQuant-MSE: randomised-Hadamard rotation per head, Lloyd-Max Gaussian codebooks,
  norm-corrected fp16 scale; uniform bits for K and V chosen separately (1..8). No calibration.
* ``gtq-{bits}`` / ``gtq-k{b}v{b}`` — Block-GTQ on top: calibrated centering and normalisation, bits
  allocated per RoPE pair (K) / channel (V) from the calibration scores, rotation inside each width group.
  High-score channels get up to 8 bits: these are the outlier channels. Needs a calibration file.

A calibrated codec's name carries the calibration digest (``gtq-k3v3@1a2b3c4d``) and any uncompressed
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

_TQ = re.compile(r"^tq-k([1-8])v([1-8])$")
_GTQ = re.compile(r"^gtq-(?:(\d+(?:\.\d+)?)|k(\d+(?:\.\d+)?)v(\d+(?:\.\d+)?))$")

# Widths Block-GTQ may use. Each width present in a head is a scale group (2 bytes per token), so the set is
# kept small: 3 widths cost at most 6 bytes per token and head on top of the codes. Measured on SmolLM2
# (4 x 1024 tokens, 4 bits): {2,4,8} +2.3% at 3.53x, {1,2,4,8} +2.6% at 3.50x, all of 1..8 +2.2% at 3.16x.
GTQ_WIDTHS = (2, 4, 8)

PRESETS = ("float16", "bfloat16", "int8", "tq-k8v4", "tq-k4v4", "tq-k4v3", "tq-k3v3", "tq-k2v2",
           "gtq-4.0", "gtq-3.5", "gtq-3.0", "gtq-2.5")


def needs_calibration(name: str) -> bool:
    return bool(_GTQ.match(name))


def check_codec_name(name: str) -> str:
    """Validate a codec name without building it (config load time); returns it or raises ValueError."""
    if name == "auto" or name in FLOAT_DTYPES or name == "int8" or _TQ.match(name):
        return name
    if match := _GTQ.match(name):
        for label, bits in (("bits", match.group(1)), ("key bits", match.group(2)), ("value bits", match.group(3))):
            if bits is not None and not 1.0 <= float(bits) <= 8.0:
                raise ValueError(f"kv codec {name!r}: {label} must be within 1..8, got {bits}")
        return name
    raise ValueError(f"unknown kv codec {name!r}; use auto, float32, float16, bfloat16, int8, tq-k<b>v<b> "
                     f"(b in 1..8), gtq-<bits> or gtq-k<bits>v<bits> (presets: {', '.join(PRESETS)})")


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
    if name == "int8":
        side = build_side_plan(torch.full(shape, 8), rotate=False, codebook="int8", scale_mode="absmax", device=device)
        side_plans = [(side, side)] * num_layers
    elif match := _TQ.match(name):
        key_bits, value_bits = int(match.group(1)), int(match.group(2))
        side_plans = [(build_side_plan(torch.full(shape, key_bits), seed=2 * layer, device=device),
                       build_side_plan(torch.full(shape, value_bits), seed=2 * layer + 1, device=device))
                      for layer in range(num_layers)]
    elif match := _GTQ.match(name):
        if calibration is None:
            raise ValueError(f"kv codec {name!r} needs a calibration file (kv_calibration; make one with "
                             f"`tierserve calibrate --out FILE`)")
        calibration.check_shape(num_layers, num_kv_heads, head_dim)
        key_bits = float(match.group(1) or match.group(2))
        value_bits = float(match.group(1) or match.group(3))
        side_plans = []
        for layer in range(num_layers):
            key_plan = build_side_plan(
                allocate_bits(calibration.key_score[layer], key_bits, rope_pairs=True, widths=GTQ_WIDTHS),
                center=calibration.key_center[layer], sigma=calibration.key_sigma[layer], seed=2 * layer,
                device=device)
            value_plan = build_side_plan(
                allocate_bits(calibration.value_score[layer], value_bits, rope_pairs=False, widths=GTQ_WIDTHS),
                center=calibration.value_center[layer], sigma=calibration.value_sigma[layer], seed=2 * layer + 1,
                device=device)
            side_plans.append((key_plan, value_plan))
        name = f"{name}@{calibration.digest()}"
    else:
        raise AssertionError(f"codec name {name!r} passed check_codec_name but has no builder")
    plans = [None if layer in exclude_layers else side_plans[layer] for layer in range(num_layers)]
    if exclude_layers:
        name = f"{name}+fp16:{','.join(str(layer) for layer in sorted(set(exclude_layers)))}"
    return QuantCodec(name, plans, num_kv_heads, head_dim)
