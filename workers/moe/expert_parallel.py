"""Expert parallelism: W decode replicas run one MoE model together, each with its own requests (data-parallel
attention) and 1/W of every MoE layer's experts.

Per MoE layer, in every rank's forward:
    route locally -> dispatch: each token goes once to every rank that holds one of its k experts, with only
    those slots filled (the others -1) -> each rank runs its experts over what it received (kernels/moe.py,
    the weighted sum over its slots) -> combine: the partial sums go back and add up at the token's rank.
A token whose experts all sit on one rank sends one row, not k (DeepEP's layout); dMoE block routing, which
makes a block's tokens share experts, therefore also cuts the bytes.

Lockstep: every collective needs every rank, so ranks agree before each step whether anyone has work (one
all-reduce); a rank with none runs an idle pass (dispatch and combine with no tokens of its own, serving its
experts to the others) - Ray Serve LLM's "dummy batch". The same handshake carries the roster's news (a member
joins: all ranks move to the next epoch together) and, every `rebalance_interval_steps` busy steps, EPLB: the
measured loads are summed over ranks, every rank computes the same new placement (workers/moe/placement.py)
and the experts that move travel over the group.

Failure: any collective error (a peer died: its sockets closed; or a timeout) drops the group. The rank joins
the roster's next epoch with the survivors, the experts nobody holds any more are read from the checkpoint, and
the interrupted step runs again (its inputs are unchanged and its K/V writes land in the same slots). The dead
replica's own requests are the Router's to move (migration).

# T=tokens, E=hidden size, k=experts per token, X=experts per layer, L=MoE layers, W=ranks,
# S=rows this rank sends, R=rows it receives, P=one expert's weights, flattened
"""

from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass
from typing import Callable, Protocol, TypeVar

import torch

from kernels.moe import fused_moe
from workers.dist.ep_group import EPGroup, EPGroupSpec, EPMembershipError, ExpertParallelError
from workers.moe.placement import ExpertPlacement, rebalance

logger = logging.getLogger(__name__)
Result = TypeVar("Result")


class EPMembership(Protocol):
    """Who is in which epoch of the group (workers/moe/roster.py; a Ray actor in the cluster)."""

    def join(self, after_epoch: int) -> EPGroupSpec:
        """Block until a group with an epoch above after_epoch forms with this member in it; EPMembershipError if
        none ever can."""
        ...

    def change_pending(self, epoch: int) -> bool:
        """Cheap (called every step): the roster wants a new epoch (a member joined)."""
        ...

    def leave(self) -> None:
        ...


class StaticMembership:
    """One fixed group that never re-forms (tests, and a group of known processes): a lost member is an error."""

    def __init__(self, spec: EPGroupSpec):
        self.spec = spec

    def join(self, after_epoch: int) -> EPGroupSpec:
        if after_epoch >= self.spec.epoch:
            raise EPMembershipError(f"the static expert-parallel group (epoch {self.spec.epoch}) lost a member "
                                      f"and cannot re-form")
        return self.spec

    def change_pending(self, epoch: int) -> bool:
        return False

    def leave(self) -> None:
        pass


ExpertSource = Callable[[], list[tuple[torch.Tensor, torch.Tensor]]]
"""Reads every MoE layer's full expert stacks (gate_up [X, 2I, E], down [X, E, I]) from the checkpoint: the
experts a lost rank held."""


@dataclass
class EPStats:
    epoch: int = -1
    world_size: int = 0
    rank: int = 0
    busy_steps: int = 0  # steps this rank ran with its own tokens
    idle_passes: int = 0  # steps it only served its experts to the others
    regroups: int = 0  # group re-formed (member lost or joined)
    rebalances: int = 0  # EPLB placements applied
    experts_moved: int = 0  # expert weights received over the group (rebalance, growth)
    experts_reloaded: int = 0  # expert weights read from the checkpoint (held by a lost rank)
    routed_tokens: int = 0  # this rank's tokens through MoE layers (summed over layers)
    dispatched_rows: int = 0  # rows sent to other ranks (a token once per other rank it needs)
    all_to_all_bytes: int = 0  # sent to other ranks, dispatch + combine
    imbalance: float = 1.0  # busiest rank's load over the mean under the current placement (last rebalance)

    @property
    def bytes_per_token(self) -> float:
        return self.all_to_all_bytes / self.routed_tokens if self.routed_tokens else 0.0


class ExpertParallelLayer:
    """One MoE layer's dispatch / local experts / combine (the SparseMoE calls `run` instead of its experts)."""

    def __init__(self, ep: "ExpertParallel", index: int):
        self.ep = ep
        self.index = index
        self.owner = torch.empty(0, dtype=torch.int64)  # [X] rank holding each expert
        self.slot_on_owner = torch.empty(0, dtype=torch.int64)  # [X] its index in that rank's stack

    def place(self, placement: ExpertPlacement) -> None:
        owners = placement.owners[self.index]
        slots = [0] * len(owners)
        seen = [0] * placement.world_size
        for expert, owner in enumerate(owners):
            slots[expert] = seen[owner]
            seen[owner] += 1
        self.owner = torch.tensor(owners, dtype=torch.int64)
        self.slot_on_owner = torch.tensor(slots, dtype=torch.int64)

    def run(self, hidden: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor, gate_up: torch.Tensor,
            down: torch.Tensor) -> torch.Tensor:
        """hidden [T, E], weights/ids [T, k] (global expert ids) -> [T, E] float32: sum_j w_j * expert_j(hidden)."""
        ep = self.ep
        group = ep.group
        assert group is not None, "expert-parallel layer run outside a group"
        num_tokens, top_k = expert_ids.shape
        ids = expert_ids.cpu()
        dest = self.owner[ids]  # [T, k]
        local_slots = self.slot_on_owner[ids]
        send_tokens, send_meta, send_counts = [], [], []
        for rank in range(group.world_size):
            on_rank = dest == rank  # [T, k]
            tokens = on_rank.any(dim=1).nonzero().squeeze(1)  # [S_r]
            send_tokens.append(tokens)
            send_counts.append(int(tokens.shape[0]))
            mask = on_rank[tokens]
            slot_ids = torch.where(mask, local_slots[tokens], -1).float()
            slot_weights = torch.where(mask, weights.cpu()[tokens].float(), 0.0)
            send_meta.append(torch.cat([slot_ids, slot_weights], dim=1))  # [S_r, 2k]
        tokens = torch.cat(send_tokens).to(hidden.device)
        # one float32 message per row: the hidden state, then k slot ids and k weights (ids < 2^24: exact)
        rows = torch.cat([hidden.float().index_select(0, tokens), torch.cat(send_meta).to(hidden.device)], dim=1)
        recv_counts = group.exchange_counts(send_counts)
        received = group.all_to_all(rows, send_counts, recv_counts)  # [R, E + 2k]
        width = hidden.shape[1]
        recv_ids = received[:, width:width + top_k].long()
        partial = fused_moe(received[:, :width], gate_up, down, received[:, width + top_k:], recv_ids)  # [R, E]
        back = group.all_to_all(partial, recv_counts, send_counts)  # [S, E]: my tokens' partial sums
        out = torch.zeros(num_tokens, width, dtype=torch.float32, device=hidden.device)
        out.index_add_(0, tokens, back)
        # accounting: what crossed to other ranks
        remote_sent = sum(count for rank, count in enumerate(send_counts) if rank != group.rank)
        remote_back = sum(count for rank, count in enumerate(recv_counts) if rank != group.rank)
        ep.stats.routed_tokens += num_tokens
        ep.stats.dispatched_rows += remote_sent
        ep.stats.all_to_all_bytes += 4 * (remote_sent * (width + 2 * top_k) + remote_back * width)
        if num_tokens:
            ep.loads[self.index] += torch.bincount(ids.flatten(), minlength=ep.loads.shape[1]).double()
        return out


@dataclass(frozen=True)
class EPOptions:
    timeout_s: float = 30.0  # a collective waiting longer than this drops the group (a hung peer)
    rebalance_interval_steps: int = 0  # EPLB every this many busy steps; 0 = never
    rebalance_min_gain: float = 0.05  # apply a new placement only if it lowers the imbalance by this much


class ExpertParallel:
    """Holds one engine's part of the group: the MoE layers' local experts, the placement, the lockstep."""

    def __init__(self, moe_layers: list, membership: EPMembership, device: torch.device, options: EPOptions,
                 expert_source: ExpertSource):
        if not moe_layers:
            raise ValueError("expert_parallel needs an MoE model (this one has no sparse layers)")
        self.moe_layers = moe_layers  # SparseMoE modules, in forward order
        self.membership = membership
        self.device = torch.device(device)
        self.options = options
        self.expert_source = expert_source
        self.num_experts = moe_layers[0].experts_gate_up.shape[0]
        # held[l]: global ids of the experts in moe_layers[l]'s stacks (all of them until the first group forms)
        self.held = [list(range(self.num_experts)) for _ in moe_layers]
        self.loads = torch.zeros(len(moe_layers), self.num_experts, dtype=torch.float64)
        self.group: EPGroup | None = None
        self.placement: ExpertPlacement | None = None
        self.stats = EPStats()
        self.peers_busy = False  # the last handshake: another rank has work (so do not wait for requests)
        self.last_total_work = 0  # ranks with work at the last handshake
        self.epoch_steps = 0  # steps with work somewhere in this epoch: equal on every rank (starts with the epoch)
        self.layers = [ExpertParallelLayer(self, index) for index in range(len(moe_layers))]
        for module, layer in zip(moe_layers, self.layers):
            module.expert_parallel = layer

    def start(self) -> None:
        """Join the first epoch (blocks until the group forms)."""
        if self.group is None:
            self._form()

    def close(self) -> None:
        self.membership.leave()
        self._drop_group()

    # ---- the lockstep ---------------------------------------------------------------------------
    def step(self, has_work: bool, forward: Callable[[], Result]) -> Result | None:
        """Agree with the other ranks, then run `forward` (this rank has work), an idle pass (others have) or
        nothing (nobody has). Survives a lost member: re-forms the group and runs the step again."""
        while True:
            if self.group is None:
                self._form()
            assert self.group is not None
            try:
                control = torch.tensor([int(has_work), int(self.membership.change_pending(self.stats.epoch))],
                                       dtype=torch.int64)
                self.group.all_reduce_sum(control)
                if control[1] > 0:  # a member is joining: every rank leaves this epoch at the same step
                    self._drop_group()
                    continue
                self.last_total_work = int(control[0])
                self.peers_busy = self.last_total_work > int(has_work)
                if not self.last_total_work:
                    return None
                self.epoch_steps += 1
                interval = self.options.rebalance_interval_steps
                if interval and self.epoch_steps % interval == 0:
                    self._rebalance()
                if has_work:
                    result = forward()
                    self.stats.busy_steps += 1
                    return result
                self._idle_pass()
                self.stats.idle_passes += 1
                return None
            except ExpertParallelError as exc:
                logger.warning("expert-parallel group lost: %s; re-forming", exc)
                self._drop_group()

    def _idle_pass(self) -> None:
        for module in self.moe_layers:
            hidden = torch.zeros(0, module.experts_gate_up.shape[2], device=self.device)
            ids = torch.zeros(0, module.top_k, dtype=torch.int64)
            module.expert_parallel.run(hidden, torch.zeros(0, module.top_k), ids, module.experts_gate_up,
                                       module.experts_down)

    # ---- forming, placing, moving -------------------------------------------------------------------
    def _form(self) -> None:
        """Join the roster's next epoch and place the experts in it; a formation that fails (a member never came
        or died meanwhile) tries the epoch after. EPMembershipError (no group possible) propagates."""
        after_epoch = self.stats.epoch
        while True:
            spec = self.membership.join(after_epoch)
            try:
                self.group = EPGroup(spec, self.device, datetime.timedelta(seconds=self.options.timeout_s))
                placement = self.placement
                if placement is None or placement.world_size != spec.world_size:
                    placement = ExpertPlacement.contiguous(len(self.moe_layers), self.num_experts, spec.world_size)
                self._apply(placement)
                break
            except ExpertParallelError as exc:
                logger.warning("expert-parallel epoch %d did not form: %s", spec.epoch, exc)
                self._drop_group()
                after_epoch = spec.epoch
        self.epoch_steps = 0
        if self.stats.epoch >= 0:
            self.stats.regroups += 1
        self.stats.epoch, self.stats.world_size, self.stats.rank = spec.epoch, spec.world_size, spec.rank
        logger.info("expert-parallel group epoch %d: rank %d of %d (%s)", spec.epoch, spec.rank, spec.world_size,
                    ", ".join(spec.members))

    def _drop_group(self) -> None:
        if self.group is not None:
            self.group.close()
        self.group = None
        self.peers_busy = False

    def _rebalance(self) -> None:
        assert self.group is not None and self.placement is not None
        loads = self.group.all_reduce_sum(self.loads.clone())
        self.loads.zero_()
        measured = loads.tolist()
        current = self.placement.imbalance(measured)
        proposal = rebalance(measured, self.group.world_size)
        proposed = proposal.imbalance(measured)
        self.stats.imbalance = current
        if proposed <= current - self.options.rebalance_min_gain:  # every rank decides alike (same sums)
            self._apply(proposal)
            self.stats.rebalances += 1
            self.stats.imbalance = proposed

    def _apply(self, placement: ExpertPlacement) -> None:
        """Make every rank hold its experts under `placement`: keep what it has, receive what another rank has
        (over the group), read the rest from the checkpoint (they were on a rank that is gone)."""
        group = self.group
        assert group is not None
        held = torch.zeros(len(self.moe_layers), self.num_experts, dtype=torch.int64)
        for index, experts in enumerate(self.held):
            held[index, experts] = 1
        everyone = group.all_gather(held)  # [W, L, X]
        reloaded: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        for index, module in enumerate(self.moe_layers):
            sender = _lowest_holder(everyone[:, index])  # [X], -1: nobody holds it
            wanted = [placement.local_experts(index, rank) for rank in range(group.world_size)]
            mine = wanted[group.rank]
            to_send = [[x for x in wanted[rank] if int(sender[x]) == group.rank] if rank != group.rank else []
                       for rank in range(group.world_size)]
            incoming = [[x for x in mine if int(sender[x]) == rank] if rank != group.rank else []
                        for rank in range(group.world_size)]
            gate_up, down = module.experts_gate_up.data, module.experts_down.data
            position = {expert: slot for slot, expert in enumerate(self.held[index])}
            flat = [torch.cat([gate_up[position[x]].flatten(), down[position[x]].flatten()])
                    for rank in range(group.world_size) for x in to_send[rank]]
            # every rank holds at least one expert (placements give each floor(X/W) >= 1), so [0] exists
            size = gate_up[0].numel() + down[0].numel()
            send = torch.stack(flat) if flat else torch.zeros(0, size, dtype=gate_up.dtype, device=gate_up.device)
            received = group.all_to_all(send, [len(x) for x in to_send], [len(x) for x in incoming])  # [R, P]
            arrived = {x: received[row] for row, x in enumerate(e for rank in incoming for e in rank)}
            missing = [x for x in mine if x not in position and x not in arrived]
            if missing and reloaded is None:
                reloaded = self.expert_source()
                logger.warning("expert-parallel: reading %d+ experts of a lost rank from the checkpoint", len(missing))
            new_gate_up, new_down = [], []
            for expert in mine:
                if expert in position:
                    new_gate_up.append(gate_up[position[expert]])
                    new_down.append(down[position[expert]])
                elif expert in arrived:
                    split = gate_up[0].numel()
                    new_gate_up.append(arrived[expert][:split].view(gate_up.shape[1:]))
                    new_down.append(arrived[expert][split:].view(down.shape[1:]))
                    self.stats.experts_moved += 1
                else:
                    assert reloaded is not None
                    new_gate_up.append(reloaded[index][0][expert].to(gate_up.device, gate_up.dtype))
                    new_down.append(reloaded[index][1][expert].to(down.device, down.dtype))
                    self.stats.experts_reloaded += 1
            module.experts_gate_up.data = torch.stack(new_gate_up).contiguous()
            module.experts_down.data = torch.stack(new_down).contiguous()
            self.held[index] = mine
            self.layers[index].place(placement)
        self.placement = placement


def make_expert_parallel(model: torch.nn.Module, membership: EPMembership, device: torch.device, config,
                         checkpoint: str, dtype: torch.dtype) -> ExpertParallel:
    """An engine's ExpertParallel over its model's sparse layers (config: workers.config.ExpertParallelConfig)."""
    from workers.model.moe import SparseMoE

    layers = [module for module in model.modules() if isinstance(module, SparseMoE)]
    options = EPOptions(timeout_s=config.timeout_s, rebalance_interval_steps=config.rebalance_interval_steps,
                        rebalance_min_gain=config.rebalance_min_gain)
    return ExpertParallel(layers, membership, device, options, checkpoint_experts(checkpoint, dtype))


def checkpoint_experts(path: str, dtype: torch.dtype) -> ExpertSource:
    """Read every sparse layer's expert stacks from the checkpoint (on CPU; the model loads whole, once per call:
    this runs only when a rank was lost)."""

    def read() -> list[tuple[torch.Tensor, torch.Tensor]]:
        from workers.model.loader import load_model
        from workers.model.moe import SparseMoE

        model = load_model(path, dtype=dtype, device="cpu").model
        return [(module.experts_gate_up.data, module.experts_down.data) for module in model.modules()
                if isinstance(module, SparseMoE)]

    return read


def _lowest_holder(holders: torch.Tensor) -> torch.Tensor:
    """holders [W, X] 0/1 -> [X] the lowest rank holding each expert, -1 if none does."""
    world = holders.shape[0]
    ranks = torch.arange(world)[:, None].expand_as(holders)
    return torch.where(holders.bool(), ranks, world).min(dim=0).values.masked_fill(~holders.bool().any(0), -1)
