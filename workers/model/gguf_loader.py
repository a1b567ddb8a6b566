"""GGUF checkpoints: metadata -> ModelConfig, tensors dequantized at load (via the `gguf` package).

llama.cpp's converter permutes the Q/K rows of Llama-architecture models for its interleaved RoPE;
we undo it so the weights are in Hugging Face's rotate_half layout (Qwen2 GGUFs are not permuted).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch

from kernels.quant_linear import BLOCK_QUANT_TYPES, BlockQuantRows
from workers.model.config import ModelConfig, RopeScaling, UnsupportedModelError

# GGML quant types we dequantize. Anything else is rejected by name before any work is done.
SUPPORTED_QUANT_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q4_K", "Q6_K")

# GGUF tensor name -> HF name ({i} is the layer index).
_GGUF_TO_HF = (
    ("token_embd.weight", "model.embed_tokens.weight"),
    ("output_norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
    ("blk.{i}.attn_norm.weight", "model.layers.{i}.input_layernorm.weight"),
    ("blk.{i}.attn_q.weight", "model.layers.{i}.self_attn.q_proj.weight"),
    ("blk.{i}.attn_k.weight", "model.layers.{i}.self_attn.k_proj.weight"),
    ("blk.{i}.attn_v.weight", "model.layers.{i}.self_attn.v_proj.weight"),
    ("blk.{i}.attn_q.bias", "model.layers.{i}.self_attn.q_proj.bias"),
    ("blk.{i}.attn_k.bias", "model.layers.{i}.self_attn.k_proj.bias"),
    ("blk.{i}.attn_v.bias", "model.layers.{i}.self_attn.v_proj.bias"),
    ("blk.{i}.attn_output.weight", "model.layers.{i}.self_attn.o_proj.weight"),
    ("blk.{i}.ffn_norm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
    ("blk.{i}.ffn_gate.weight", "model.layers.{i}.mlp.gate_proj.weight"),
    ("blk.{i}.ffn_up.weight", "model.layers.{i}.mlp.up_proj.weight"),
    ("blk.{i}.ffn_down.weight", "model.layers.{i}.mlp.down_proj.weight"),
)
_NAME_PATTERNS = [
    (re.compile("^" + re.escape(g).replace(r"\{i\}", r"(\d+)") + "$"), h) for g, h in _GGUF_TO_HF
]
ROPE_FREQS_TENSOR = "rope_freqs.weight"


class CorruptModelError(ValueError):
    """The file is not a readable GGUF / checkpoint."""


def open_gguf(path: str | os.PathLike):
    from gguf import GGUFReader

    if not os.path.isfile(path):
        raise FileNotFoundError(f"model file not found: {path}")
    try:
        return GGUFReader(path)
    except Exception as exc:  # the reader raises ValueError/struct errors/IndexError on junk
        raise CorruptModelError(f"{path} is not a valid GGUF file: {exc}") from exc


def read_metadata(reader) -> dict[str, Any]:
    return {key: field.contents() for key, field in reader.fields.items()}


def model_config_from_gguf(metadata: dict[str, Any], tensor_names: set[str]) -> ModelConfig:
    arch = metadata.get("general.architecture")
    if arch not in ("llama", "mistral", "qwen2"):
        raise UnsupportedModelError(f"unsupported GGUF architecture {arch!r}; supported: llama, mistral, qwen2")

    def field(key: str, default: Any = None) -> Any:
        value = metadata.get(f"{arch}.{key}", default)
        if value is None:
            raise CorruptModelError(f"GGUF metadata lacks {arch}.{key}")
        return value

    num_heads = int(field("attention.head_count"))
    hidden_size = int(field("embedding_length"))
    context_length = int(field("context_length"))
    scaling_type = metadata.get(f"{arch}.rope.scaling.type", "none")
    if scaling_type in ("none", None) or ROPE_FREQS_TENSOR in tensor_names:
        rope_scaling = RopeScaling("default")  # llama3-style factors, if any, come as a tensor
    elif scaling_type == "linear":
        rope_scaling = RopeScaling("linear", factor=float(field("rope.scaling.factor")))
    else:
        raise UnsupportedModelError(f"unsupported GGUF rope scaling type {scaling_type!r}")
    vocab_size = metadata.get(f"{arch}.vocab_size") or len(metadata["tokenizer.ggml.tokens"])
    return ModelConfig(
        architecture=arch,
        vocab_size=int(vocab_size),
        hidden_size=hidden_size,
        intermediate_size=int(field("feed_forward_length")),
        num_layers=int(field("block_count")),
        num_heads=num_heads,
        num_kv_heads=int(field("attention.head_count_kv", num_heads)),
        head_dim=int(metadata.get(f"{arch}.attention.key_length") or hidden_size // num_heads),
        rms_norm_eps=float(field("attention.layer_norm_rms_epsilon")),
        rope_theta=float(field("rope.freq_base", 10000.0)),
        rope_scaling=rope_scaling,
        max_position_embeddings=context_length,
        tie_word_embeddings="output.weight" not in tensor_names,
        qkv_bias="blk.0.attn_q.bias" in tensor_names,
    )


def check_quant_types(reader) -> None:
    for tensor in reader.tensors:
        if tensor.tensor_type.name not in SUPPORTED_QUANT_TYPES:
            raise UnsupportedModelError(
                f"tensor {tensor.name!r} uses quant type {tensor.tensor_type.name}; supported: "
                f"{', '.join(SUPPORTED_QUANT_TYPES)}"
            )


def iter_hf_weights(reader, config: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, fp32 tensor) for every model tensor, dequantized and un-permuted."""
    from gguf.quants import dequantize

    for tensor in reader.tensors:
        if tensor.name == ROPE_FREQS_TENSOR:
            continue
        hf_name = _hf_name(tensor.name)
        if hf_name is None:
            raise UnsupportedModelError(f"unexpected GGUF tensor {tensor.name!r}")
        array = dequantize(tensor.data, tensor.tensor_type)
        # The reader gives shapes in GGML order (fastest dim first); numpy order is the reverse.
        array = np.require(array, dtype=np.float32, requirements=["W"]).reshape([int(d) for d in reversed(tensor.shape)])
        weight = torch.from_numpy(array)
        rope_heads = _rope_permuted_heads(hf_name, config)
        if rope_heads:
            weight = unpermute_rope_rows(weight, rope_heads)
        yield hf_name, weight


def _rope_permuted_heads(hf_name: str, config: ModelConfig) -> int | None:
    """The heads llama.cpp's converter permuted this tensor's rows for (Q/K of Llama-architecture GGUFs), or None."""
    if config.architecture not in ("llama", "mistral"):
        return None
    if ".q_proj." in hf_name:
        return config.num_heads
    if ".k_proj." in hf_name:
        return config.num_kv_heads
    return None


@dataclass(frozen=True)
class GGUFBlockTensor:
    """A 2-D weight stored in a block type the kernel reads (kernels/quant_linear.py BLOCK_QUANT_TYPES: Q4_0, Q4_1,
    Q8_0, Q5_0, Q4_K, Q6_K), kept as the file's bytes for the block-quantized linears
    (workers/model/block_quant_linear.py). The bytes are a view of the memory-mapped file: free to keep."""

    hf_name: str
    type_name: str
    data: np.ndarray  # the raw blocks, as stored
    shape: tuple[int, int]  # [out features, in features]
    rope_heads: int | None  # llama.cpp permuted these rows for this many heads (Q/K of Llama GGUFs)

    def rows(self) -> BlockQuantRows:
        """The blocks in Hugging Face row order (dequantize() equals iter_hf_weights' tensor exactly)."""
        rows = BlockQuantRows.from_gguf(self.type_name, self.data, *self.shape)
        if self.rope_heads:
            rows = rows.map_rows(lambda t: unpermute_rope_rows(t, self.rope_heads))
        return rows


def block_quant_tensors(reader, config: ModelConfig) -> dict[str, GGUFBlockTensor]:
    """HF name -> the block-quantized 2-D weights of the file (the other tensors are only in iter_hf_weights)."""
    found = {}
    for tensor in reader.tensors:
        hf_name = _hf_name(tensor.name)
        if hf_name is None or tensor.tensor_type.name not in BLOCK_QUANT_TYPES or len(tensor.shape) != 2:
            continue
        in_features, out_features = (int(d) for d in tensor.shape)  # GGML order: fastest dim first
        found[hf_name] = GGUFBlockTensor(hf_name, tensor.tensor_type.name, tensor.data, (out_features, in_features),
                                         _rope_permuted_heads(hf_name, config))
    return found


def rope_freq_factors(reader) -> torch.Tensor | None:
    for tensor in reader.tensors:
        if tensor.name == ROPE_FREQS_TENSOR:
            return torch.from_numpy(np.asarray(tensor.data, dtype=np.float32).copy())
    return None


def unpermute_rope_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Inverse of llama.cpp's permute: per head, rows (pair, 2) -> (2, pair) i.e. interleaved -> halves."""
    rows = weight.shape[0]
    rest = weight.shape[1:]
    return (weight.reshape(num_heads, rows // num_heads // 2, 2, *rest)
            .transpose(1, 2).reshape(rows, *rest).contiguous())


def _hf_name(gguf_name: str) -> str | None:
    for pattern, hf in _NAME_PATTERNS:
        match = pattern.match(gguf_name)
        if match:
            return hf.format(i=match.group(1)) if match.groups() else hf
    return None
