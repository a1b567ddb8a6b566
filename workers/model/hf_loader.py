"""Hugging Face checkpoints: config.json + safetensors (single file or sharded with an index)."""

from __future__ import annotations

import json
import os
from typing import Iterator

import torch

from workers.model.config import ModelConfig
from workers.model.gguf_loader import CorruptModelError


def read_hf_config(model_dir: str | os.PathLike) -> ModelConfig:
    config_path = os.path.join(model_dir, "config.json")
    try:
        with open(config_path) as f:
            return ModelConfig.from_hf_config(json.load(f))
    except json.JSONDecodeError as exc:
        raise CorruptModelError(f"{config_path} is not valid JSON: {exc}") from exc
    except KeyError as exc:
        raise CorruptModelError(f"{config_path} lacks required field {exc}") from exc


def safetensors_files(model_dir: str | os.PathLike) -> list[str]:
    index_path = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index_path):
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
        return [os.path.join(model_dir, name) for name in sorted(set(weight_map.values()))]
    files = sorted(name for name in os.listdir(model_dir) if name.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {model_dir}")
    return [os.path.join(model_dir, name) for name in files]


def iter_hf_weights(model_dir: str | os.PathLike) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for path in safetensors_files(model_dir):
        try:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except (OSError, ValueError, RuntimeError) as exc:
            if isinstance(exc, FileNotFoundError):
                raise
            raise CorruptModelError(f"cannot read safetensors file {path}: {exc}") from exc
