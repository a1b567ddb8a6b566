"""ModelConfig: the architecture facts the decoder needs, read from GGUF metadata or HF config.json.

Validated once here; the model and the engine receive plain values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture, quant type or option is not one this runtime implements."""


# Architectures the one Llama-family decoder class covers. Mistral GGUFs declare "llama".
SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")

_HF_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}


@dataclass(frozen=True)
class RopeScaling:
    rope_type: str  # "default" | "linear" | "llama3"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"unsupported architecture {self.architecture!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if self.num_heads % self.num_kv_heads != 0:
            raise UnsupportedModelError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.rope_scaling.rope_type not in ("default", "linear", "llama3"):
            raise UnsupportedModelError(f"unsupported rope_scaling type {self.rope_scaling.rope_type!r}")

    @property
    def num_queries_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any]) -> "ModelConfig":
        architectures = hf.get("architectures") or []
        architecture = hf.get("model_type")
        for name in architectures:
            if name in _HF_ARCHITECTURES:
                architecture = _HF_ARCHITECTURES[name]
                break
        else:
            if architectures and architecture not in SUPPORTED_ARCHITECTURES:
                raise UnsupportedModelError(
                    f"unsupported architecture {architectures[0]!r}; supported: {', '.join(_HF_ARCHITECTURES)}"
                )
        num_heads = int(hf["num_attention_heads"])
        hidden_size = int(hf["hidden_size"])
        rope_params = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
        rope_theta = float(hf.get("rope_theta", rope_params.get("rope_theta", 10000.0)))
        return cls(
            architecture=str(architecture),
            vocab_size=int(hf["vocab_size"]),
            hidden_size=hidden_size,
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
            head_dim=int(hf.get("head_dim") or hidden_size // num_heads),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=_rope_scaling_from_hf(rope_params, int(hf.get("max_position_embeddings", 8192))),
            max_position_embeddings=int(hf.get("max_position_embeddings", 8192)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            # Qwen2 always has q/k/v bias; Llama exposes it as attention_bias.
            qkv_bias=bool(hf.get("attention_bias", False)) or architecture == "qwen2",
        )


def _rope_scaling_from_hf(params: Mapping[str, Any], max_position_embeddings: int) -> RopeScaling:
    rope_type = str(params.get("rope_type", params.get("type", "default")))
    if rope_type == "default" or not params:
        return RopeScaling("default")
    return RopeScaling(
        rope_type=rope_type,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(
            params.get("original_max_position_embeddings", max_position_embeddings)
        ),
    )
