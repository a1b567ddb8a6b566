# L=layers, N=blocks in the pool, S=block size (tokens), T=tokens written, W=observation-window queries,
# H=query heads, Hkv=KV heads, G=H//Hkv, D=head dim, Tk=keys a query chunk sees, nb=blocks covering Tk,
# Bd=decode sequences, M=block-table columns
"""Block importance scores for eviction: what feeds them, where they are stored, how one step collects them.

A sequence's score of block j is a sum of votes. Each vote is one query's attention over the sequence's
blocks in one (layer, KV head) -- its G query heads' probabilities summed -- optionally weighted per token by
the value's size (value-aware eviction), then normalised to sum to 1, so layers and heads with large values
do not drown the others. The weights:

* ``l1``     -- ||v_t||_1, the VATP weighting (a token that is attended but adds almost nothing to the output,
               like an attention sink, is worth less than its attention says);
* ``output`` -- ||W_O v_t||_2 through the KV head's output-projection columns (the CriticalKV refinement: what
               the token actually moves in the residual stream).

Votes come from two places: the observation window (the prompt's last W queries, at the end of prefill --
they have read the question, so the needle gets its votes; SnapKV) and every decode step. A policy picks
which of the two it uses (``ScoreSpec``). Scores live in the eviction hook (workers/kv/eviction_hook.py), one
row per voter (layer, KV head) and held block: a policy decides how to combine them (a sum, or the largest
share any voter gives).

The weights are computed from the values as the model produced them, before a lossy codec encodes them (and
from the decoded pages for an imported prompt): a weight steers which block to keep, and the codec's error
on it is far below what separates blocks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

Weighting = Literal["none", "l1", "output"]


@dataclass(frozen=True)
class ScoreSpec:
    """How a sequence's block scores are fed. Crosses to the prefill tier, so it is a small plain record."""

    observe_window: int  # prompt queries that vote at the end of prefill (0: none)
    accumulate_decode: bool  # every decode step votes too
    weighting: Weighting = "none"


def output_maps(o_proj_weights: list[torch.Tensor], num_kv_heads: int, head_dim: int) -> list[torch.Tensor]:
    """Per layer [Hkv, D, D]: sum over the KV head's query heads g of W_g^T W_g, so ||W_O v||^2 = v^T M v.

    o_proj weight is [hidden, H*D]; W_g = its columns for query head g. Summing over the G heads that read the
    same value measures how far v moves the output through all of them.
    """
    maps = []
    for weight in o_proj_weights:
        hidden, width = weight.shape
        per_head = weight.float().view(hidden, width // head_dim, head_dim)  # [hidden, H, D]
        gram = torch.einsum("khd,khe->hde", per_head, per_head)  # [H, D, D]
        maps.append(gram.view(num_kv_heads, -1, head_dim, head_dim).sum(1).contiguous())
    return maps


def value_weights(value: torch.Tensor, weighting: Weighting, output_map: torch.Tensor | None) -> torch.Tensor | None:
    """value [T, Hkv, D] -> per-token weights [T, Hkv] float32 (None for unweighted scores)."""
    if weighting == "none":
        return None
    value = value.float()
    if weighting == "l1":
        return value.abs().sum(-1)
    if output_map is None:
        raise ValueError("output-weighted scores need the layer's output map")
    return torch.einsum("thd,hde,the->th", value, output_map, value).clamp_min(0).sqrt()


class TokenWeightStore:
    """Per-token value weights beside the pages ([N, S, Hkv] float32 per layer), written with the K/V."""

    def __init__(self, weighting: Weighting, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 device: torch.device, maps: list[torch.Tensor] | None):
        assert weighting != "none", "an unweighted policy needs no store"
        self.weighting = weighting
        self.maps = maps
        self.arrays = [torch.zeros(num_blocks, block_size, num_kv_heads, dtype=torch.float32, device=device)
                       for _ in range(num_layers)]

    def output_map(self, layer: int) -> torch.Tensor | None:
        return self.maps[layer] if self.maps is not None else None

    def write(self, layer: int, slot_mapping: torch.Tensor, value: torch.Tensor) -> None:
        weights = value_weights(value, self.weighting, self.output_map(layer))
        storage = self.arrays[layer]
        storage.view(-1, storage.shape[-1]).index_copy_(0, slot_mapping, weights)

    def write_blocks(self, layer: int, block_ids: list[int], value: torch.Tensor) -> None:
        """value [len(block_ids)*S, Hkv, D], e.g. the decoded pages of an imported prompt."""
        storage = self.arrays[layer]
        weights = value_weights(value, self.weighting, self.output_map(layer))
        storage[torch.tensor(block_ids, dtype=torch.long, device=storage.device)] = weights.view(
            len(block_ids), *storage.shape[1:])

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int) -> int:
        return num_layers * num_kv_heads * 4


def observation_block_mass(query: torch.Tensor, key: torch.Tensor, weights: torch.Tensor | None, scale: float,
                           block_size: int) -> torch.Tensor:
    """Votes of the last W queries over all Tk keys, summed per block -> [Hkv, nb] float32.

    query [W, H, D] are the LAST W positions of key [Tk, Hkv, D] (causal); weights [Tk, Hkv] or None.
    Each (query, KV head) vote is normalised to 1 after weighting, as ScoreCollector.add_decode does.
    """
    num_queries, num_heads, _ = query.shape
    num_keys, num_kv_heads, _ = key.shape
    group = num_heads // num_kv_heads
    q = query.float().view(num_queries, num_kv_heads, group, -1)
    logits = torch.einsum("whgd,thd->hgwt", q, key.float()) * scale  # [Hkv, G, W, Tk]
    query_pos = torch.arange(num_keys - num_queries, num_keys, device=query.device)
    future = torch.arange(num_keys, device=query.device)[None, :] > query_pos[:, None]  # [W, Tk]
    # Exactly a decode vote per query: the G query heads' probabilities summed, weighted, normalised per KV head.
    mass = torch.softmax(logits.masked_fill(future, float("-inf")), dim=-1).sum(1)  # [Hkv, W, Tk]
    if weights is not None:
        mass = mass * weights.float().t()[:, None, :]
    mass = mass / mass.sum(-1, keepdim=True).clamp_min(1e-30)
    per_token = mass.sum(1)  # [Hkv, Tk]
    num_blocks = -(-num_keys // block_size)
    padded = per_token.new_zeros(num_kv_heads, num_blocks * block_size)
    padded[:, :num_keys] = per_token
    return padded.view(num_kv_heads, num_blocks, block_size).sum(-1)


@dataclass
class ScoreCollector:
    """One step's score by-products, filled layer by layer by the attention (an AttentionProbe) and read back by
    the eviction hook. Observations are keyed by the observer: the index of the request in the step's ModelInput."""

    block_size: int
    collect_decode: bool  # decode rows report their block mass this step
    store: TokenWeightStore | None  # engine-wide value weights (written for every token), or None
    maps: list[torch.Tensor] | None = None  # output maps for output-weighted observation windows
    weightings: dict[int, Weighting] = field(default_factory=dict)  # observer -> how its window's votes are weighted
    decode_layers: list[torch.Tensor] = field(default_factory=list)  # per layer [Bd, Hkv, M] votes
    observed_layers: dict[int, list[torch.Tensor]] = field(default_factory=dict)  # observer -> per layer [Hkv, nb]

    # ---- the AttentionProbe side (workers/attention.py calls these) ----
    def write(self, layer: int, slot_mapping: torch.Tensor, value: torch.Tensor) -> None:
        """The step's values were written to their slots: weigh them too (value-aware scores)."""
        if self.store is not None:
            self.store.write(layer, slot_mapping, value)

    def decode_weights(self, layer: int) -> torch.Tensor | None:
        return self.store.arrays[layer] if self.store is not None else None

    def add_decode(self, mass: torch.Tensor) -> None:
        """mass [Bd, Hkv, M] from one layer's decode attention."""
        self.decode_layers.append(mass / mass.sum(-1, keepdim=True).clamp_min(1e-30))

    def observe(self, observer: int, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                scale: float) -> None:
        """query [W, H, D]: the window's queries, the last W positions of key/value [Tk, Hkv, D]."""
        weights = value_weights(value, self.weightings.get(observer, "none"), self.output_map(layer))
        self.add_observation(observer, observation_block_mass(query, key, weights, scale, self.block_size))

    # ---- the hook side ----
    def add_observation(self, observer: int, mass: torch.Tensor) -> None:
        self.observed_layers.setdefault(observer, []).append(mass)

    @property
    def decode_mass(self) -> torch.Tensor | None:
        """[Bd, V, M]: one row of votes per voter (layer, KV head), V = L * Hkv."""
        return torch.cat(self.decode_layers, dim=1) if self.decode_layers else None

    def observed(self, observer: int) -> torch.Tensor:
        """[V, nb] the observer's window votes per voter (layer, KV head)."""
        return torch.cat(self.observed_layers[observer], dim=0)

    def output_map(self, layer: int) -> torch.Tensor | None:
        return self.maps[layer] if self.maps is not None else None
