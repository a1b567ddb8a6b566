"""ModelConfig: the architecture facts the decoder needs, read from GGUF metadata or HF config.json.

Validated once here; the model and the engine receive plain values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture, quant type or option is not one this runtime implements."""


# Architectures the one Llama-family decoder class covers. Mistral GGUFs declare "llama". The MoE ones swap some
# or all MLPs for a routed mixture of experts (workers/model/moe.py); Qwen3-MoE adds per-head q/k RMSNorm.
SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "mixtral", "qwen2_moe", "qwen3_moe")

_HF_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
}


@dataclass(frozen=True)
class MoEConfig:
    """A routed mixture of experts in place of some layers' MLP."""

    num_experts: int
    top_k: int  # experts per token
    expert_intermediate_size: int
    sparse_layers: tuple[int, ...]  # the layers whose MLP is the mixture; the others keep a dense MLP
    scoring: str = "softmax"  # softmax over all experts | sigmoid (DeepSeek-V3 style, with a selection bias)
    renormalize: bool = True  # top-k weights divided by their sum (Mixtral, Qwen3-MoE; Qwen2-MoE: its config)
    shared_intermediate_size: int = 0  # an always-on shared expert of this width (0: none)
    shared_expert_gate: bool = False  # Qwen2-MoE: the shared expert's output scaled by sigmoid(gate . x)
    routed_scaling_factor: float = 1.0  # DeepSeek-V3: the routed experts' sum is scaled by this
    num_groups: int = 1  # DeepSeek-V3 group-limited routing: experts in groups, the best topk_groups kept
    topk_groups: int = 1

    def __post_init__(self) -> None:
        if not 0 < self.top_k <= self.num_experts:
            raise UnsupportedModelError(f"moe: top_k {self.top_k} must be in 1..num_experts ({self.num_experts})")
        if self.scoring not in ("softmax", "sigmoid"):
            raise UnsupportedModelError(f"moe: unknown expert scoring {self.scoring!r}")
        if self.num_experts % self.num_groups or not 0 < self.topk_groups <= self.num_groups:
            raise UnsupportedModelError(f"moe: {self.num_experts} experts in {self.num_groups} groups, keeping "
                                        f"{self.topk_groups}: groups must divide the experts")


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
    qk_norm: bool = False  # per-head RMSNorm on q and k before RoPE (Qwen3)
    moe: MoEConfig | None = None

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
        num_layers = int(hf["num_hidden_layers"])
        rope_params = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
        rope_theta = float(hf.get("rope_theta", rope_params.get("rope_theta", 10000.0)))
        window = hf.get("sliding_window")
        if window is not None and (architecture == "mixtral" or hf.get("use_sliding_window")):
            raise UnsupportedModelError(f"sliding-window attention ({window} tokens) is not implemented")
        if architecture == "qwen2_moe":
            qkv_bias = bool(hf.get("qkv_bias", True))
        else:
            # Qwen2 always has q/k/v bias; Llama exposes it as attention_bias.
            qkv_bias = bool(hf.get("attention_bias", False)) or architecture == "qwen2"
        return cls(
            architecture=str(architecture),
            vocab_size=int(hf["vocab_size"]),
            hidden_size=hidden_size,
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
            head_dim=int(hf.get("head_dim") or hidden_size // num_heads),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=_rope_scaling_from_hf(rope_params, int(hf.get("max_position_embeddings", 8192))),
            max_position_embeddings=int(hf.get("max_position_embeddings", 8192)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            qk_norm=architecture == "qwen3_moe",
            moe=_moe_from_hf(str(architecture), hf, num_layers),
        )


def _moe_from_hf(architecture: str, hf: Mapping[str, Any], num_layers: int) -> MoEConfig | None:
    if architecture == "mixtral":
        return MoEConfig(num_experts=int(hf["num_local_experts"]), top_k=int(hf["num_experts_per_tok"]),
                         expert_intermediate_size=int(hf["intermediate_size"]), sparse_layers=tuple(range(num_layers)))
    if architecture in ("qwen2_moe", "qwen3_moe"):
        num_experts = int(hf["num_experts"] if "num_experts" in hf else hf["num_local_experts"])  # (transformers 5)
        step = int(hf.get("decoder_sparse_step", 1))
        dense = set(hf.get("mlp_only_layers") or ())
        sparse = tuple(layer for layer in range(num_layers)
                       if layer not in dense and num_experts > 0 and (layer + 1) % step == 0)
        shared = int(hf.get("shared_expert_intermediate_size", 0) or 0) if architecture == "qwen2_moe" else 0
        return MoEConfig(num_experts=num_experts, top_k=int(hf["num_experts_per_tok"]),
                         expert_intermediate_size=int(hf["moe_intermediate_size"]), sparse_layers=sparse,
                         renormalize=bool(hf.get("norm_topk_prob", architecture == "qwen3_moe")),
                         shared_intermediate_size=shared, shared_expert_gate=shared > 0)
    return None


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
