"""One Llama-family decoder (Llama, Mistral, Qwen2; Mixtral, Qwen2-MoE, Qwen3-MoE): GQA, RoPE, optional q/k/v bias
and per-head q/k norm, a dense MLP or a routed mixture of experts per layer (workers/model/moe.py), tied or untied
head.

q/k/v and gate/up are fused into one matmul each (fewer, larger GEMMs: the decode step on a CPU is
dominated by per-op overhead and weight reads). Weights arrive under Hugging Face names and are
routed by the declared STACKED_PARAMS table.

# T=tokens in the step, E=hidden size, I=intermediate size, H=query heads, Hkv=KV heads, D=head dim, V=vocab
"""

from __future__ import annotations

import re
from typing import Iterable

import torch
from torch import nn

from kernels.fused_ops import rms_norm, rope_
from workers.attention import AttentionMetadata, paged_attention
from workers.kv.codecs import KVCodec, LayerPages
from workers.model.config import ModelConfig
from workers.model.moe import DenseMLP, SparseMoE
from workers.model.rope import RotaryEmbedding, rope_inv_freq

# (our fused parameter, HF projection name, shard index) — the HF projections packed into one matmul.
STACKED_PARAMS = (
    ("qkv_proj", "q_proj", 0),
    ("qkv_proj", "k_proj", 1),
    ("qkv_proj", "v_proj", 2),
    ("gate_up_proj", "gate_proj", 0),
    ("gate_up_proj", "up_proj", 1),
)

# Checkpoints store experts one by one (HF's own save format, every hub MoE): layers.N.mlp.experts.M.gate_proj
# (Mixtral: block_sparse_moe.experts.M.w1/w3/w2). They land in the stacked [X, 2I, E] / [X, E, I] parameters;
# HF's in-memory fused names (experts.gate_up_proj / experts.down_proj) load whole.
_EXPERT_TENSOR = re.compile(r"^(layers\.\d+\.mlp)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj|w1|w3|w2)\.weight$")
_FUSED_EXPERTS = re.compile(r"^(layers\.\d+\.mlp)\.experts\.(gate_up_proj|down_proj)$")
_EXPERT_PROJECTION = {"gate_proj": ("experts_gate_up", 0), "w1": ("experts_gate_up", 0),
                      "up_proj": ("experts_gate_up", 1), "w3": ("experts_gate_up", 1),
                      "down_proj": ("experts_down", None), "w2": ("experts_down", None)}
_ROUTER_NAMES = ((".mlp.gate.weight", ".mlp.router.weight"),
                 (".mlp.gate.e_score_correction_bias", ".mlp.score_bias"))


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """x [T, E] -> normed [T, E]; with `residual`, x += residual in place first (x is the residual stream).
        One native pass on fp32 CPU tensors (kernels/fused_ops.py), else torch's own fused rms_norm."""
        return rms_norm(x, self.weight, self.eps, residual)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size = config.num_heads * config.head_dim
        self.kv_size = config.num_kv_heads * config.head_dim
        self.shard_sizes = (self.q_size, self.kv_size, self.kv_size)
        self.qkv_proj = nn.Linear(config.hidden_size, sum(self.shard_sizes), bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=False)
        self.scale = self.head_dim ** -0.5
        # Qwen3: RMSNorm over each head's q and k (shared across heads) before RoPE
        self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps) if config.qk_norm else None

    def project(self, hidden: torch.Tensor, rope_cos_sin: tuple[torch.Tensor, torch.Tensor]
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """hidden [T, E] -> query [T, H, D], key [T, Hkv, D] (both rotated), value [T, Hkv, D]."""
        num_tokens = hidden.shape[0]
        qkv = self.qkv_proj(hidden)  # [T, (H + 2 Hkv) D]
        if self.q_norm is not None:
            for norm, start, size in ((self.q_norm, 0, self.q_size), (self.k_norm, self.q_size, self.kv_size)):
                heads = qkv[:, start:start + size].reshape(-1, self.head_dim)  # [T * heads, D] (a copy)
                qkv[:, start:start + size] = norm(heads).view(num_tokens, size)
        # q and k are adjacent in qkv: rotate them as one [T, H + Hkv, D] view, in place.
        query_key = rope_(
            qkv[:, :self.q_size + self.kv_size].view(num_tokens, self.num_heads + self.num_kv_heads, self.head_dim),
            *rope_cos_sin)
        query, key = query_key.split((self.num_heads, self.num_kv_heads), dim=1)
        value = qkv[:, self.q_size + self.kv_size:].view(num_tokens, self.num_kv_heads, self.head_dim)
        return query, key, value

    def forward(self, hidden: torch.Tensor, rope_cos_sin: tuple[torch.Tensor, torch.Tensor], pages: LayerPages,
                codec: KVCodec, meta: AttentionMetadata) -> torch.Tensor:
        query, key, value = self.project(hidden, rope_cos_sin)
        out = paged_attention(query, key, value, pages, codec, meta, self.scale)  # [T, H, D]
        return self.o_proj(out.reshape(hidden.shape[0], self.q_size))


class MLP(DenseMLP):
    def __init__(self, config: ModelConfig):
        super().__init__(config.hidden_size, config.intermediate_size)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int = 0):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        sparse = config.moe is not None and layer_index in config.moe.sparse_layers
        self.mlp = SparseMoE(config) if sparse else MLP(config)

    def forward(self, hidden, rope_cos_sin, pages, codec, meta) -> torch.Tensor:
        """hidden [T, E] is the residual stream, updated in place (the model's own activation, never an input's)."""
        attention_out = self.self_attn(self.input_layernorm(hidden), rope_cos_sin, pages, codec, meta)
        normed = self.post_attention_layernorm(hidden, residual=attention_out)  # hidden += attention_out
        return hidden.add_(self.mlp(normed))


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype, device: torch.device,
                 rope_freq_factors: torch.Tensor | None = None):
        super().__init__()
        self.config = config
        self.dtype = dtype
        self.device = device
        # Built on the meta device: random init of 100M+ parameters would cost seconds, and every
        # parameter is overwritten by load_weights (which checks that none is left out).
        with torch.device("meta"):
            self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
            self.layers = nn.ModuleList(DecoderLayer(config, index) for index in range(config.num_layers))
            self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.to_empty(device=device)
        self.to(dtype)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.requires_grad_(False)
        self.rope = RotaryEmbedding(rope_inv_freq(config, rope_freq_factors), config.max_position_embeddings,
                                    dtype, device)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_pages: list[LayerPages],
                codec: KVCodec, meta: AttentionMetadata) -> torch.Tensor:
        """input_ids [T], positions [T] -> final hidden states [T, E] (normed)."""
        return self.forward_captured(input_ids, positions, kv_pages, codec, meta, ())[0]

    def forward_captured(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_pages: list[LayerPages],
                         codec: KVCodec, meta: AttentionMetadata, capture_layer_ids: tuple[int, ...]
                         ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """forward, also returning the residual stream entering each of capture_layer_ids ([T, C*E], in that
        order; None when none is asked): what an EAGLE-3 head reads (workers/spec/eagle3.py)."""
        hidden = self.embed_tokens(input_ids)
        rope_cos_sin = self.rope.lookup(positions)
        captured = {}
        for index, (layer, pages) in enumerate(zip(self.layers, kv_pages)):
            if index in capture_layer_ids:
                captured[index] = hidden.clone()  # the layers update the stream in place
            hidden = layer(hidden, rope_cos_sin, pages, codec, meta)
        aux = torch.cat([captured[index] for index in capture_layer_ids], dim=-1) if capture_layer_ids else None
        return self.norm(hidden), aux

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, E] -> logits [N, V] in float32."""
        return self.lm_head(hidden).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Take (HF name, tensor) pairs; every parameter must be covered exactly once."""
        params = dict(self.named_parameters(remove_duplicate=False))
        loaded: set[str] = set()
        for hf_name, tensor in weights:
            name = _our_name(hf_name)
            if name is None:
                continue  # rotary buffers and similar non-parameters
            if self._load_expert(name, tensor, params, loaded, hf_name):
                continue
            target, shard = _stacked_target(name)
            if target not in params:
                raise KeyError(f"checkpoint tensor {hf_name!r} has no matching parameter ({target})")
            param = params[target]
            if shard is None:
                _copy_checked(param.data, tensor, hf_name)
            else:
                module = self.get_submodule(target.rsplit(".", 2)[0])
                sizes = module.shard_sizes
                start = sum(sizes[:shard])
                _copy_checked(param.data.narrow(0, start, sizes[shard]), tensor, hf_name)
                target = f"{target}#{shard}"
            loaded.add(target)
        self._check_all_loaded(loaded)

    def _load_expert(self, name: str, tensor: torch.Tensor, params: dict[str, nn.Parameter], loaded: set[str],
                     hf_name: str) -> bool:
        """An expert's tensor into its stacked parameter (True), or not an expert tensor (False)."""
        match = _EXPERT_TENSOR.match(name)
        if match:
            prefix, expert, projection = match.group(1), int(match.group(2)), match.group(3)
            stacked, shard = _EXPERT_PROJECTION[projection]
            target = f"{prefix}.{stacked}"
            if target not in params:
                raise KeyError(f"checkpoint tensor {hf_name!r} has no matching parameter ({target})")
            param = params[target].data
            if not 0 <= expert < param.shape[0]:
                raise ValueError(f"checkpoint tensor {hf_name!r}: expert {expert} of {param.shape[0]}")
            dst = param[expert]
            if shard is not None:
                size = dst.shape[0] // 2
                dst = dst.narrow(0, shard * size, size)
            _copy_checked(dst, tensor, hf_name)
            loaded.add(_expert_key(target, expert, shard))
            return True
        match = _FUSED_EXPERTS.match(name)
        if match:
            target = f"{match.group(1)}.{'experts_gate_up' if match.group(2) == 'gate_up_proj' else 'experts_down'}"
            _copy_checked(params[target].data, tensor, hf_name)
            loaded.update(_expert_keys(target, params[target]))
            return True
        return False

    def _check_all_loaded(self, loaded: set[str]) -> None:
        num_shards = {fused: sum(1 for f, _, _ in STACKED_PARAMS if f == fused) for fused, _, _ in STACKED_PARAMS}
        expected = set()
        for name, param in self.named_parameters(remove_duplicate=False):
            if self.config.tie_word_embeddings and name == "lm_head.weight":
                continue
            module = name.rsplit(".", 2)[-2]
            if name.endswith((".experts_gate_up", ".experts_down")):
                expected.update(_expert_keys(name, param))
            elif module in num_shards:
                expected.update(f"{name}#{shard}" for shard in range(num_shards[module]))
            else:
                expected.add(name)
        missing = sorted(expected - loaded)
        if missing:
            raise ValueError(f"checkpoint is missing {len(missing)} tensors, e.g. {missing[:3]}")


def _our_name(hf_name: str) -> str | None:
    if "rotary_emb" in hf_name:
        return None
    name = hf_name.removeprefix("model.").replace(".block_sparse_moe.", ".mlp.")
    for theirs, ours in _ROUTER_NAMES:
        if name.endswith(theirs):
            return name[:-len(theirs)] + ours
    return name


def _expert_key(target: str, expert: int, shard: int | None) -> str:
    return f"{target}@{expert}#{shard}"


def _expert_keys(target: str, param: torch.Tensor) -> set[str]:
    shards = (0, 1) if target.endswith("experts_gate_up") else (None,)
    return {_expert_key(target, expert, shard) for expert in range(param.shape[0]) for shard in shards}


def _stacked_target(name: str) -> tuple[str, int | None]:
    for fused, proj, shard in STACKED_PARAMS:
        if f".{proj}." in name:
            return name.replace(f".{proj}.", f".{fused}."), shard
    return name, None


def _copy_checked(dst: torch.Tensor, src: torch.Tensor, hf_name: str) -> None:
    if tuple(dst.shape) != tuple(src.shape):
        raise ValueError(f"tensor {hf_name!r} has shape {tuple(src.shape)}, expected {tuple(dst.shape)}")
    dst.copy_(src)
