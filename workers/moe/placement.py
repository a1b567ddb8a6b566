"""Expert placement: which rank of an expert-parallel group holds each expert of each MoE layer.

Plain-Python bookkeeping (no torch.distributed): every rank computes the same placement from the same inputs, so a
placement never has to be sent. Two ways to make one:

* ``ExpertPlacement.contiguous`` - rank r holds experts [r*X/W, (r+1)*X/W) of every layer: the start, and the
  placement after a group re-forms with another size (nothing measured yet).
* ``rebalance`` - EPLB-style, from measured loads (tokens routed per expert): per layer, experts in descending
  load go to the least-loaded rank that still has room (every rank holds ceil or floor X/W experts, so memory stays
  even). Greedy longest-processing-time first: within 4/3 of the best balance, and deterministic (ties by index).

# L=MoE layers, X=experts per layer, W=ranks in the group
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ExpertPlacement:
    world_size: int
    owners: tuple[tuple[int, ...], ...]  # [L][X] -> the rank holding that expert

    @classmethod
    def contiguous(cls, num_layers: int, num_experts: int, world_size: int) -> "ExpertPlacement":
        if not 1 <= world_size <= num_experts:
            raise ValueError(f"expert_parallel: {world_size} ranks for {num_experts} experts per layer (at most one "
                             f"rank per expert)")
        per_rank = _capacities(num_experts, world_size)
        layer: list[int] = []
        for rank, count in enumerate(per_rank):
            layer += [rank] * count
        return cls(world_size, tuple(tuple(layer) for _ in range(num_layers)))

    @property
    def num_layers(self) -> int:
        return len(self.owners)

    @property
    def num_experts(self) -> int:
        return len(self.owners[0]) if self.owners else 0

    def local_experts(self, layer: int, rank: int) -> list[int]:
        """The experts `rank` holds in `layer`, ascending (the order of its stacked weights)."""
        return [expert for expert, owner in enumerate(self.owners[layer]) if owner == rank]

    def rank_loads(self, loads: list[list[float]]) -> list[list[float]]:
        """Per layer, the load each rank would carry: loads [L][X] -> [L][W]."""
        out = []
        for layer, owners in enumerate(self.owners):
            per_rank = [0.0] * self.world_size
            for expert, owner in enumerate(owners):
                per_rank[owner] += loads[layer][expert]
            out.append(per_rank)
        return out

    def imbalance(self, loads: list[list[float]]) -> float:
        """Busiest rank over the mean, averaged over layers (1.0 = even; what EPLB drives down)."""
        ratios = []
        for per_rank in self.rank_loads(loads):
            total = sum(per_rank)
            if total > 0:
                ratios.append(max(per_rank) * self.world_size / total)
        return sum(ratios) / len(ratios) if ratios else 1.0


def rebalance(loads: list[list[float]], world_size: int) -> ExpertPlacement:
    """A placement that evens out the measured loads [L][X] over world_size ranks (see the module note)."""
    owners = []
    for layer_loads in loads:
        capacity = _capacities(len(layer_loads), world_size)
        rank_load = [0.0] * world_size
        held = [0] * world_size
        layer = [0] * len(layer_loads)
        for expert in sorted(range(len(layer_loads)), key=lambda e: (-layer_loads[e], e)):
            rank = min((r for r in range(world_size) if held[r] < capacity[r]), key=lambda r: (rank_load[r], r))
            layer[expert] = rank
            rank_load[rank] += layer_loads[expert]
            held[rank] += 1
        owners.append(tuple(layer))
    return ExpertPlacement(world_size, tuple(owners))


def _capacities(num_experts: int, world_size: int) -> list[int]:
    base, extra = divmod(num_experts, world_size)
    return [base + (1 if rank < extra else 0) for rank in range(world_size)]
