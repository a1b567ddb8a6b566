# T=decode rows, E=hidden size, H=query heads, Hkv=KV heads, D=head dim, I=intermediate size, F=D/2, M=max blocks
"""All decoder layers of a pure-decode step in one native call (kernels/cpu_decode_layers.c).

The module path (LlamaForCausalLM.forward) already runs every op of a CPU fp32 decode step as a native kernel; what
is left between them is Python: ~15 module calls and ~40 tensor ops per layer, ~20% of a 32-stream step on 2 cores,
during which the second core spins idle. This path makes the same kernel calls, in the same order and with the same
thread count, from C, so its hidden states are bit-identical to the module path's
(tests/reference/test_native_decode.py).

It applies to a step only when the module path would take exactly those kernels: CPU fp32 model, every linear
block-quantized, identity KV pages (fp32 or fp16), decode rows only (no prefill chunk), at most `max_rows` rows,
no eviction scores to collect, native kernels built. Anything else takes the module path.
"""

from __future__ import annotations

import ctypes

import torch

from kernels.cpu_native import (STATUS_BAD_BLOCK, STATUS_BAD_LENGTH, STATUS_NO_MEMORY, STATUS_UNSUPPORTED,
                                native_kernels)
from workers.attention import AttentionMetadata
from workers.kv.codecs import IdentityCodec, KVCodec, LayerPages
from workers.model.block_quant_linear import BlockQuantLinear
from workers.model.llama import LlamaForCausalLM


class _QuantWeight(ctypes.Structure):
    _fields_ = [("format", ctypes.c_int32), ("group", ctypes.c_int32), ("quants", ctypes.c_void_p),
                ("scales", ctypes.c_void_p), ("mins", ctypes.c_void_p), ("bias", ctypes.c_void_p),
                ("in_features", ctypes.c_int64), ("out_features", ctypes.c_int64)]


class _DecodeLayer(ctypes.Structure):
    _fields_ = [("input_norm", ctypes.c_void_p), ("post_norm", ctypes.c_void_p), ("qkv", _QuantWeight),
                ("o", _QuantWeight), ("gate_up", _QuantWeight), ("down", _QuantWeight),
                ("key_pages", ctypes.c_void_p), ("value_pages", ctypes.c_void_p)]


class _DecodeStep(ctypes.Structure):
    _fields_ = [*((name, ctypes.c_int64) for name in ("T", "E", "H", "Hkv", "D", "I", "num_slots", "S", "M")),
                ("eps", ctypes.c_float), ("scale", ctypes.c_float), ("half", ctypes.c_int32),
                ("num_threads", ctypes.c_int32),
                *((name, ctypes.c_void_p) for name in ("cos", "sin", "slots", "block_tables", "seq_lens", "tail_masks", "normed",
                                                       "qkv", "attn", "proj", "gate_up", "act"))]


def _quant_weight(linear: BlockQuantLinear) -> _QuantWeight:
    packed = linear.packed
    return _QuantWeight(4 if packed.kind == "q4" else 8, packed.group, packed.quants.data_ptr(),
                        packed.scales.data_ptr(), None if packed.mins is None else packed.mins.data_ptr(),
                        None if linear.bias is None else linear.bias.data_ptr(), packed.in_features,
                        packed.out_features)


def _fp32_cpu_contiguous(*tensors: torch.Tensor | None) -> bool:
    return all(t is None or (t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous())
               for t in tensors)


class NativeDecodeLayers:
    """The model's layers as C structs (weights and KV page pointers fixed at build time), run per decode step."""

    def __init__(self, model: LlamaForCausalLM, codec: IdentityCodec, kv_pages: list[LayerPages], library):
        config = model.config
        self.model = model
        self.library = library
        self.half = int(codec.dtype == torch.float16)
        self.num_slots = kv_pages[0]["key"].shape[0] * kv_pages[0]["key"].shape[1]
        self.block_size = kv_pages[0]["key"].shape[1]
        self.max_rows = min(min(linear.max_rows for linear in _linears(layer)) for layer in model.layers)
        self.shape = (config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim,
                      config.intermediate_size)
        self.eps = model.layers[0].input_layernorm.eps
        self.scale = model.layers[0].self_attn.scale
        # The structs hold raw pointers: keep everything they point into alive with them (the pool never
        # reallocates its pages; nothing swaps a BlockQuantLinear once built).
        self._pages = kv_pages
        self._modules = [(layer.input_layernorm, layer.post_attention_layernorm, *_linears(layer))
                         for layer in model.layers]
        self.layers = (_DecodeLayer * len(model.layers))()
        for struct, layer, pages in zip(self.layers, model.layers, kv_pages):
            attention, mlp = layer.self_attn, layer.mlp
            struct.input_norm = layer.input_layernorm.weight.data_ptr()
            struct.post_norm = layer.post_attention_layernorm.weight.data_ptr()
            struct.qkv, struct.o = _quant_weight(attention.qkv_proj), _quant_weight(attention.o_proj)
            struct.gate_up, struct.down = _quant_weight(mlp.gate_up_proj), _quant_weight(mlp.down_proj)
            struct.key_pages, struct.value_pages = pages["key"].data_ptr(), pages["value"].data_ptr()

    @classmethod
    def build(cls, model: LlamaForCausalLM, codec: KVCodec, kv_pages: list[LayerPages]) -> NativeDecodeLayers | None:
        """The fast path for this model and pool, or None where any layer would not take the native kernels."""
        library = native_kernels()
        if library is None or model.dtype != torch.float32 or model.device.type != "cpu" or not kv_pages:
            return None
        if type(codec) is not IdentityCodec or codec.dtype not in (torch.float32, torch.float16):
            return None
        if codec.dtype == torch.float16 and not library.native_has_half():
            return None  # no F16C: fp16 pages take torch's paths
        if model.config.moe is not None or model.config.qk_norm:
            return None  # the native layer call knows dense MLPs and plain q/k only
        head_dim = model.config.head_dim
        if head_dim % 2 or head_dim > 256:
            return None  # the native RoPE and attention refuse these (torch runs them)
        if len(kv_pages) != len(model.layers):
            return None
        for pages in kv_pages:
            key, value = pages.arrays.get("key"), pages.arrays.get("value")
            if key is None or value is None or key.dtype != codec.dtype or value.dtype != codec.dtype:
                return None
            if not (key.is_contiguous() and value.is_contiguous()) or key.shape != value.shape:
                return None
            if key.shape != kv_pages[0]["key"].shape or key.shape[2:] != (model.config.num_kv_heads, head_dim):
                return None
        eps = {float(m.eps) for layer in model.layers for m in (layer.input_layernorm, layer.post_attention_layernorm)}
        if len(eps) != 1:
            return None
        for layer in model.layers:
            if not all(isinstance(linear, BlockQuantLinear) for linear in _linears(layer)):
                return None
            if not _fp32_cpu_contiguous(layer.input_layernorm.weight, layer.post_attention_layernorm.weight,
                                        *(linear.bias for linear in _linears(layer))):
                return None
        return cls(model, codec, kv_pages, library)

    def applies(self, meta: AttentionMetadata, num_tokens: int) -> bool:
        """Whether this step is one the module path would run entirely through the native kernels (C reads T rows
        of every table it is given, so their shapes are checked here, as the module path's kernels check them)."""
        if not (0 < num_tokens <= self.max_rows and meta.num_decode_tokens == num_tokens and not meta.prefills
                and meta.probe is None and meta.decode_block_tables is not None):
            return False
        tables, lens, slots = meta.decode_block_tables, meta.decode_seq_lens, meta.slot_mapping
        tails = meta.decode_tail_masks
        if tails is not None and not (tails.dtype == torch.int64 and tails.shape == (num_tokens,)
                                      and tails.device.type == "cpu"):
            return False
        return (tables.dtype == torch.int32 and lens.dtype == torch.int32 and slots.dtype == torch.int64
                and tables.dim() == 2 and tables.shape[0] == num_tokens and lens.shape == (num_tokens,)
                and slots.shape == (num_tokens,)
                and all(t.device.type == "cpu" for t in (tables, lens, slots)))

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
                ) -> torch.Tensor | None:
        result = self.forward_captured(input_ids, positions, meta, ())
        return None if result is None else result[0]

    @torch.inference_mode()
    def forward_captured(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                         capture_layer_ids: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """input_ids [T], positions [T] -> final hidden states [T, E] (normed), as LlamaForCausalLM.forward; None
        when a kernel could not run here (no memory for its scratch): the caller runs the step through the module
        path, whose torch fallbacks take over. Rerunning is safe: every K/V row written so far is rewritten with
        the same values."""
        model = self.model
        num_tokens = input_ids.shape[0]
        hidden_size, num_heads, num_kv_heads, head_dim, intermediate = self.shape
        hidden = model.embed_tokens(input_ids).contiguous()  # [T, E], the residual stream
        cos, sin = model.rope.lookup(positions)  # [T, F]
        cos, sin = cos.contiguous(), sin.contiguous()
        block_tables = meta.decode_block_tables.contiguous()
        seq_lens = meta.decode_seq_lens.contiguous()
        tail_masks = meta.decode_tail_masks.contiguous() if meta.decode_tail_masks is not None else None
        slots = meta.slot_mapping.contiguous()
        qkv_size = (num_heads + 2 * num_kv_heads) * head_dim
        widths = (hidden_size, qkv_size, num_heads * head_dim, hidden_size, 2 * intermediate, intermediate)
        # normed, qkv, attn, proj, gate_up, act: each [T, width] contiguous, in one allocation
        scratch = torch.empty(num_tokens * sum(widths), dtype=torch.float32).split(
            [num_tokens * width for width in widths])
        step = _DecodeStep(
            num_tokens, hidden_size, num_heads, num_kv_heads, head_dim, intermediate, self.num_slots,
            self.block_size, block_tables.shape[1], self.eps, self.scale, self.half, torch.get_num_threads(),
            cos.data_ptr(), sin.data_ptr(), slots.data_ptr(), block_tables.data_ptr(), seq_lens.data_ptr(),
            tail_masks.data_ptr() if tail_masks is not None else None,
            *(buffer.data_ptr() for buffer in scratch))
        # Captured layers split the call: run the layers before each, copy the stream, go on.
        captured = {}
        bounds = sorted(set(capture_layer_ids) | {0, len(self.layers)})
        layer_size = ctypes.sizeof(_DecodeLayer)
        for first, end in zip(bounds, bounds[1:]):
            if first in capture_layer_ids:
                captured[first] = hidden.clone()
            layers_address = ctypes.addressof(self.layers) + first * layer_size
            status = self.library.decode_layers(hidden.data_ptr(), layers_address, end - first, ctypes.byref(step))
            if status:
                self._raise_for(status, first)
                return None
        aux = torch.cat([captured[index] for index in capture_layer_ids], dim=-1) if capture_layer_ids else None
        return model.norm(hidden), aux

    @staticmethod
    def _raise_for(status: int, first_layer: int) -> None:
        """Raise for a failed native call's status, unless the module path can take over (then return)."""
        if status:
            layer, code = (status >> 8) - 1 + first_layer, status & 0xFF
            if code & ~(STATUS_NO_MEMORY | STATUS_UNSUPPORTED) == 0:
                return  # (quant_linear's bad format is 1 too: never, for weights this class packed)
            if code & STATUS_BAD_LENGTH:
                raise AssertionError(f"layer {layer}: seq_lens: a sequence is longer than its block_tables row")
            if code & STATUS_BAD_BLOCK:
                raise IndexError(f"layer {layer}: a block id or slot is outside the pool")
            raise RuntimeError(f"layer {layer}: a native decode kernel failed (status {code})")


def _linears(layer) -> tuple:
    return layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj
