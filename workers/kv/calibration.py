"""KV calibration (Block-GTQ keys, TurboQuant outlier channels): per-channel statistics from one pass over real
text, and bit allocation.

One forward pass records, per layer and KV head, each channel's mean and spread of the post-RoPE keys and of
the values, and how much an error in that channel costs:

* keys — a key error e moves the logit by q.e, so channel i weighs E[q_i^2] (summed over the query heads that
  share the KV head) times sigma_i^2 (the codec quantizes the normalised channel);
* values — a value error reaches the residual stream through W_O, so channel i weighs sigma_i^2 times the
  squared norm of its W_O columns (summed over the group's query heads). Recorded for study: no codec allocates
  value bits by it now (it measured worse than TurboQuant's uniform values, see workers/kv/presets.py); the value
  center and sigma give the RMS that picks TurboQuant's outlier channels.

`allocate_bits` then spends an average budget greedily where it lowers sum_i score_i * mse(b_i) the most
(mse = the Lloyd-Max error of a b-bit Gaussian quantizer). Keys are allocated per RoPE frequency pair
(channels i and i + D/2 rotate together, so they share a width), as in Block-GTQ.

# L=layers, Hkv=KV heads, G=query heads per KV head, D=head dim, T=calibration tokens
"""

from __future__ import annotations

import hashlib
import heapq
import io
from dataclasses import dataclass

import torch

from workers.attention import causal_attention
from workers.kv.codebooks import MAX_BITS, gaussian_mse

_FIELDS = ("key_center", "key_sigma", "key_score", "value_center", "value_sigma", "value_score")


@dataclass(frozen=True)
class KVCalibration:
    key_center: torch.Tensor  # [L, Hkv, D]
    key_sigma: torch.Tensor  # [L, Hkv, D]
    key_score: torch.Tensor  # [L, Hkv, D]
    value_center: torch.Tensor
    value_sigma: torch.Tensor
    value_score: torch.Tensor
    num_tokens: int

    @property
    def num_layers(self) -> int:
        return self.key_center.shape[0]

    def save(self, path: str) -> None:
        torch.save({**{name: getattr(self, name).float().cpu() for name in _FIELDS},
                    "num_tokens": self.num_tokens, "format": "tierserve-kv-calibration-1"}, path)

    @classmethod
    def load(cls, path: str) -> "KVCalibration":
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise ValueError(f"KV calibration file {path!r} does not exist (create it with `tierserve calibrate`)")
        except Exception as exc:
            raise ValueError(f"KV calibration file {path!r} is not readable: {exc}") from exc
        if not isinstance(data, dict) or data.get("format") != "tierserve-kv-calibration-1":
            raise ValueError(f"{path!r} is not a tierserve KV calibration file")
        return cls(**{name: data[name] for name in _FIELDS}, num_tokens=int(data["num_tokens"]))

    def digest(self) -> str:
        """Short content hash: both tiers must use the same calibration, so it is part of the codec name."""
        buffer = io.BytesIO()
        for name in _FIELDS:
            buffer.write(getattr(self, name).float().contiguous().numpy().tobytes())
        return hashlib.sha256(buffer.getvalue()).hexdigest()[:8]

    def check_shape(self, num_layers: int, num_kv_heads: int, head_dim: int) -> None:
        expected = (num_layers, num_kv_heads, head_dim)
        if tuple(self.key_center.shape) != expected:
            raise ValueError(f"KV calibration is for shape {tuple(self.key_center.shape)} (layers, KV heads, head dim)"
                             f" but the model has {expected}; calibrate this model with `tierserve calibrate`")


@torch.inference_mode()
def calibrate(model, texts_token_ids: list[list[int]]) -> KVCalibration:
    """Run the model over each token list (one causal pass each) and collect the statistics."""
    config = model.config
    num_layers, num_kv_heads, head_dim = config.num_layers, config.num_kv_heads, config.head_dim
    group = config.num_heads // num_kv_heads
    sums = {name: torch.zeros(num_layers, num_kv_heads, head_dim, dtype=torch.float64)
            for name in ("k", "k2", "q2", "v", "v2")}
    num_tokens = 0
    for token_ids in texts_token_ids:
        ids = torch.tensor(token_ids, dtype=torch.long, device=model.device)
        positions = torch.arange(len(token_ids), device=model.device)
        hidden = model.embed_tokens(ids)
        rope_cos_sin = model.rope.lookup(positions)
        for index, layer in enumerate(model.layers):
            attention = layer.self_attn
            query, key, value = attention.project(layer.input_layernorm(hidden), rope_cos_sin)
            key64, value64 = key.double().cpu(), value.double().cpu()
            sums["k"][index] += key64.sum(0)
            sums["k2"][index] += key64.square().sum(0)
            sums["v"][index] += value64.sum(0)
            sums["v2"][index] += value64.square().sum(0)
            sums["q2"][index] += query.double().cpu().square().view(-1, num_kv_heads, group, head_dim).sum((0, 2))
            out = causal_attention(query, key, value, attention.scale)
            hidden = hidden + attention.o_proj(out.reshape(len(token_ids), -1))
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        num_tokens += len(token_ids)
    key_center = sums["k"] / num_tokens
    value_center = sums["v"] / num_tokens
    key_sigma = (sums["k2"] / num_tokens - key_center.square()).clamp_min(1e-12).sqrt()
    value_sigma = (sums["v2"] / num_tokens - value_center.square()).clamp_min(1e-12).sqrt()
    key_score = sums["q2"] / num_tokens * key_sigma.square()
    output_weight = torch.stack([layer.self_attn.o_proj.weight.double().cpu().square().sum(0)
                                 .view(num_kv_heads, group, head_dim).sum(1) for layer in model.layers])
    value_score = value_sigma.square() * output_weight
    return KVCalibration(key_center.float(), key_sigma.float(), key_score.float(), value_center.float(),
                         value_sigma.float(), value_score.float(), num_tokens)


def allocate_bits(score: torch.Tensor, average_bits: float, *, rope_pairs: bool,
                  widths: tuple[int, ...] = tuple(range(1, MAX_BITS + 1))) -> torch.Tensor:
    """score [Hkv, D] -> bits [Hkv, D]: each head spends at most round(average_bits * D) bits, greedily.

    Widths come from `widths` only (ascending): every distinct width is a group with its own scale per
    token, so fewer widths means less metadata. A step moves a unit to the next allowed width; steps are
    taken by error reduction per bit spent.
    """
    widths = tuple(sorted(set(widths)))
    if not widths or widths[0] < 1 or widths[-1] > MAX_BITS:
        raise ValueError(f"widths must be within 1..{MAX_BITS}, got {widths}")
    num_kv_heads, head_dim = score.shape
    mse = {bits: gaussian_mse(bits) for bits in widths}
    budget = round(average_bits * head_dim) - widths[0] * head_dim
    if budget < 0:
        raise ValueError(f"average_bits {average_bits} is below the narrowest width {widths[0]}")
    # Units: a RoPE pair (i, i + D/2) for keys, a single channel for values.
    half = head_dim // 2
    units = [(i, i + half) for i in range(half)] if rope_pairs else [(i,) for i in range(head_dim)]
    bits = torch.empty(num_kv_heads, head_dim, dtype=torch.int32)
    for head in range(num_kv_heads):
        unit_score = [float(sum(score[head, c] for c in unit)) for unit in units]
        level = [0] * len(units)  # index into widths

        def step(u: int) -> tuple[float, int]:
            """(error reduction per bit, bits) of moving unit u one allowed width up."""
            now, nxt = widths[level[u]], widths[level[u] + 1]
            cost = (nxt - now) * len(units[u])
            return unit_score[u] * (mse[now] - mse[nxt]) / cost, cost

        heap = [(-step(u)[0], u) for u in range(len(units)) if len(widths) > 1]
        heapq.heapify(heap)
        remaining = budget
        while heap:
            _, unit = heapq.heappop(heap)
            _, cost = step(unit)
            if cost > remaining:
                continue  # does not fit; cheaper steps of other units still may
            level[unit] += 1
            remaining -= cost
            if level[unit] + 1 < len(widths):
                heapq.heappush(heap, (-step(unit)[0], unit))
        for unit, unit_level in zip(units, level):
            for channel in unit:
                bits[head, channel] = widths[unit_level]
    return bits
