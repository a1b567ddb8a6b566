"""`tierserve eval memory`: KV bytes for a long context under each codec, from the codecs' own byte accounting.

No formula is duplicated here: each codec is built for the model shape and asked `bytes_per_token(layer)`.
Block-GTQ's size depends on how many key width groups its allocation ends up using per head (each costs one
fp16 scale per token), which depends on the calibration; for shapes without a calibration the table uses a
synthetic one whose scores span eight orders of magnitude, so every width the budget can reach is used (all
three from 3 bits up; a 2.5-bit budget reaches widths 2 and 4 only).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ModelShape:
    name: str
    num_layers: int
    num_kv_heads: int
    head_dim: int


SHAPES = (
    ModelShape("SmolLM2-135M", 30, 3, 64),
    ModelShape("Llama-3.1-8B", 32, 8, 128),
    ModelShape("Qwen3-30B-A3B", 48, 4, 128),
)
MEMORY_PRESETS = ("float16", "int8", "tq-k8v4", "tq-k4v4", "tq-k4v3", "tq-k3v3", "tq-k2v2", "tq-k3v4+qjl",
                  "tq-k4.5v4", "gtq-4.0", "gtq-k3v4", "gtq-3.0", "gtq-2.5")


def _upper_bound_calibration(shape: ModelShape):
    """Scores spread over orders of magnitude, so every allowed width (group) appears in every head."""
    from workers.kv.calibration import KVCalibration

    size = (shape.num_layers, shape.num_kv_heads, shape.head_dim)
    ramp = torch.logspace(-4, 4, shape.head_dim).expand(size).contiguous()
    return KVCalibration(key_center=torch.zeros(size), key_sigma=torch.ones(size), key_score=ramp,
                         value_center=torch.zeros(size), value_sigma=torch.ones(size), value_score=ramp,
                         num_tokens=0)


def bytes_per_token(shape: ModelShape, preset: str) -> int:
    from workers.kv.presets import make_codec, needs_calibration

    calibration = _upper_bound_calibration(shape) if needs_calibration(preset) else None
    codec = make_codec(preset, model_dtype=torch.float16, num_layers=shape.num_layers,
                       num_kv_heads=shape.num_kv_heads, head_dim=shape.head_dim, calibration=calibration)
    return sum(codec.bytes_per_token(layer) for layer in range(shape.num_layers))


def memory_table(context_tokens: int, presets=MEMORY_PRESETS, shapes=SHAPES) -> list[dict]:
    rows = []
    for preset in presets:
        row = {"codec": preset}
        for shape in shapes:
            per_token = bytes_per_token(shape, preset)
            row[shape.name] = {"bytes_per_token": per_token, "gib": per_token * context_tokens / 2**30}
        rows.append(row)
    return rows


def run_memory(args: argparse.Namespace) -> int:
    rows = memory_table(args.context_tokens)
    names = [shape.name for shape in SHAPES]
    print(f"KV cache for a {args.context_tokens:,}-token context (GiB; bytes/token in brackets)")
    print(f"{'codec':<10} " + " ".join(f"{name:>24}" for name in names))
    for row in rows:
        cells = " ".join(f"{row[name]['gib']:>14.1f} [{row[name]['bytes_per_token']:>7}]" for name in names)
        print(f"{row['codec']:<10} {cells}")
    if args.json_out:
        with open(args.json_out, "w") as handle:
            json.dump({"context_tokens": args.context_tokens, "rows": rows}, handle, indent=2)
        print(f"[eval memory] wrote {args.json_out}", file=sys.stderr)
    return 0
