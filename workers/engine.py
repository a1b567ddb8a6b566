"""Engine: a thin facade over the step's parts; add_request / step / abort, hold / reserve / import.

One step, as records (workers/step.py):
    [Speculator.propose: drafts] -> Scheduler.schedule() -> SchedulerOutput -> EvictionHook.plan -> ModelInput
    -> ModelRunner.execute -> ModelOutput -> EvictionHook.observe [-> Speculator.observe] -> Scheduler.update
    -> RequestOutputs -> EvictionHook.after_update
The scheduler owns the request lifecycle (advancing, stops, finishing, holds, reservations); eviction is a
step hook. No Ray here: a plain process can own an Engine (tests, benchmarks, `tierserve run`).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch

from workers.config import EngineConfig
from workers.gc_heap import freeze_gc_heap
from workers.intake import RequestIntake
from workers.kv.block_pool import BlockPool
from workers.kv.block_scores import ScoreSpec, TokenWeightStore, output_maps
from workers.kv.calibration import KVCalibration
from workers.kv.codecs import KVCodec
from workers.kv.eviction import EvictionBudget, make_eviction_policy
from workers.kv.eviction_hook import EvictionHook
from workers.kv.manager import KVCacheManager
from workers.kv.presets import make_codec
from workers.model.block_quant_linear import quantize_linears
from workers.model.loader import LoadedModel, load_model
from workers.model.moe import moe_stats, set_block_routing
from workers.moe.expert_parallel import EPMembership, ExpertParallel, make_expert_parallel
from workers.model.packed_linear import pack_linears
from workers.model_runner import ModelRunner
from workers.outputs import Completion, RequestOutput
from workers.sampling_params import SamplingParams
from workers.scheduler import Scheduler
from workers.sequence import Sequence
from workers.spec.drafter import PromptFeatures
from workers.spec.policy import StepCostModel
from workers.spec.prompt_features import PromptFeatureCollector, prompt_feature_layers
from workers.spec.speculator import Speculator, make_drafter, make_policy


@dataclass(frozen=True)
class HeldKV:
    """A prefilled request's KV, kept for a decode replica to pull (prefill role)."""

    request_id: str
    block_ids: tuple[int, ...]
    num_tokens: int  # tokens whose K/V the blocks hold (the prompt)
    first_token_id: int
    block_scores: torch.Tensor | None = None  # [V, blocks] observation-window votes, when the decode tier asked
    num_cached_tokens: int = 0  # prompt tokens this replica's prefix cache served
    drafter_features: PromptFeatures | None = None  # the prompt's captured states, for an EAGLE-3 decode tier


@dataclass(frozen=True)
class KVStats:
    num_blocks: int
    num_used_blocks: int
    num_free_blocks: int
    block_size: int
    bytes_per_block: int
    num_evicted_blocks: int  # lifetime count of blocks dropped by the eviction policy


class Engine:
    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None,
                 ep_membership: EPMembership | None = None):
        """ep_membership: run the MoE layers expert-parallel in the group it hands out (the engine must own its
        model then: the stacks are cut to this rank's experts)."""
        self.config = config
        if config.num_threads is not None:
            torch.set_num_threads(config.num_threads)
        self.device = config.resolved_device()
        self.loaded = loaded or load_model(config.model, dtype=config.resolved_dtype(), device=self.device)
        self.model = self.loaded.model
        if config.block_quant_linears:
            quantize_linears(self.model, self.loaded.block_tensors)  # in place, once, like the packing below
        if config.pack_cpu_weights:
            pack_linears(self.model)  # fp32 CPU linears only; in place, once: a shared model is packed for all
        # An MoE model's routing rule (dMoE blocks or free): a property of the loaded model, so engines sharing
        # one loaded model share it.
        set_block_routing(self.model, config.moe_routing.block_size, config.moe_routing.coreset_threshold)
        self.tokenizer = self.loaded.tokenizer
        model_config = self.loaded.config
        calibration = KVCalibration.load(config.kv_calibration) if config.kv_calibration else None
        self.codec: KVCodec = make_codec(
            config.kv_codec, model_dtype=self.model.dtype, num_layers=model_config.num_layers,
            num_kv_heads=model_config.num_kv_heads, head_dim=model_config.head_dim, device=self.device,
            calibration=calibration, exclude_layers=tuple(config.kv_exclude_layers))
        self.block_size = config.block_size
        # A prefill replica never evicts (it hands over the whole prompt) but computes the observation-window
        # votes a decode tier asks for, so it keeps the output maps.
        eviction = config.kv_eviction
        policy = make_eviction_policy(
            "none" if config.role == "prefill" else eviction.policy,
            EvictionBudget(fraction=eviction.budget, max_blocks=eviction.budget_blocks,
                           sink_blocks=eviction.sink_blocks, recent_blocks=eviction.recent_blocks),
            eviction.observe_window, eviction.value_norm, eviction.aggregate)
        self.score_spec: ScoreSpec | None = policy.score_spec  # how this engine's own requests are scored
        weighting = self.score_spec.weighting if self.score_spec is not None else "none"
        maps = None
        if config.role == "prefill" or weighting == "output":
            maps = output_maps([layer.self_attn.o_proj.weight for layer in self.model.layers],
                               model_config.num_kv_heads, model_config.head_dim)
        # Value weights (value-aware eviction) live beside the pages and cost memory like them.
        weight_bytes_per_token = TokenWeightStore.bytes_per_token(model_config.num_layers, model_config.num_kv_heads) \
            if weighting != "none" else 0
        bytes_per_block = (sum(self.codec.bytes_per_token(layer) for layer in range(model_config.num_layers))
                           + weight_bytes_per_token) * self.block_size
        num_blocks = config.num_kv_blocks or max(1, config.kv_cache_memory_mb * 2**20 // bytes_per_block)
        self.kv_pages = [self.codec.allocate(layer, num_blocks, self.block_size, self.device)
                         for layer in range(model_config.num_layers)]
        self.pool = BlockPool(num_blocks, enable_prefix_caching=config.enable_prefix_caching)
        self.kv = KVCacheManager(self.pool, self.block_size)
        # A lone sequence must always fit in the pool, or it could wait forever.
        self.max_model_len = min(config.max_model_len or model_config.max_position_embeddings,
                                 model_config.max_position_embeddings, num_blocks * self.block_size)
        self.intake = RequestIntake(self.tokenizer, model_config.vocab_size, self.max_model_len)
        self.scheduler = Scheduler(self.kv, config.max_num_seqs, config.max_num_batched_tokens, self.tokenizer,
                                   self.max_model_len)
        weight_store = None
        if weighting != "none":
            weight_store = TokenWeightStore(weighting, model_config.num_layers, num_blocks, self.block_size,
                                            model_config.num_kv_heads, self.device, maps)
        self.eviction = EvictionHook(policy, self.kv, self.scheduler.requests, weight_store, maps)
        self.runner = ModelRunner(self.model, self.codec, self.kv_pages, self.block_size,
                                  native_decode=config.native_decode_layers)
        spec = config.speculative
        self.speculator: Speculator | None = None
        # A prefill tier samples one token (nothing to draft) but captures what the decode tier's drafter reads
        # of the prompt (EAGLE-3's features), which rides the KV ticket.
        self.prompt_features = PromptFeatureCollector(prompt_feature_layers(config, self.loaded)) \
            if config.role == "prefill" else None
        if spec.method != "none" and config.role != "prefill":
            cost = StepCostModel(spec.row_cost_prior)
            self.speculator = Speculator(make_drafter(config, self.loaded), make_policy(config, cost),
                                         self.max_model_len, cost)
        self._capture_layer_ids = self.speculator.capture_layer_ids if self.speculator is not None else \
            (self.prompt_features.layer_ids if self.prompt_features is not None else ())
        self._bytes_per_block = bytes_per_block
        self.expert_parallel: ExpertParallel | None = None
        if ep_membership is not None:
            self.expert_parallel = make_expert_parallel(self.model, ep_membership, self.device,
                                                        config.expert_parallel, self.loaded.path,
                                                        config.resolved_dtype())
            self.expert_parallel.start()  # joins the group (blocks until it forms)
        if config.freeze_gc_heap:
            freeze_gc_heap()  # last: everything the engine keeps for its lifetime exists by now

    # ---- requests -------------------------------------------------------------------------------
    def make_sequence(self, request_id: str, prompt: str | None = None, prompt_token_ids: list[int] | None = None,
                      params: SamplingParams | None = None, hold_kv: bool = False) -> Sequence:
        """Validate and tokenize a request (no engine state touched: safe from any thread)."""
        return self.intake.make_sequence(request_id, prompt, prompt_token_ids, params, hold_kv)

    def add_sequence(self, seq: Sequence, score_spec: ScoreSpec | None = None) -> None:
        """score_spec: block scores a decode tier wants computed here (prefill role); otherwise the engine's own."""
        self.scheduler.add(seq)
        self.eviction.track(seq, score_spec or self.score_spec)

    def add_request(self, request_id: str, prompt: str | None = None, prompt_token_ids: list[int] | None = None,
                    params: SamplingParams | None = None) -> None:
        self.add_sequence(self.make_sequence(request_id, prompt, prompt_token_ids, params))

    def abort(self, request_id: str) -> RequestOutput | None:
        """Cancel a request wherever it is: queued, running, held for export or mid-import."""
        if self.release_kv(request_id):
            return None
        output = self.scheduler.abort(request_id)
        if output is not None:
            self._forget(request_id)
        return output

    # ---- disaggregation: prefill side ---------------------------------------------------------------
    def held_kv(self, request_id: str) -> HeldKV | None:
        seq = self.scheduler.held.get(request_id)
        if seq is None:
            return None
        features = self.prompt_features.of(request_id) if self.prompt_features is not None else None
        return HeldKV(request_id, tuple(seq.block_table), seq.num_prompt_tokens, seq.output_token_ids[-1],
                      self.eviction.scores_of(request_id), seq.num_cached_tokens, features)

    def release_kv(self, request_id: str, owner: Sequence | None = None) -> bool:
        """Free a held (prefill) or reserved (decode) request's blocks: after the transfer, or on its timeout.
        With `owner`, only if that sequence is the one holding them (a late release never frees the blocks of
        another request that took the same id)."""
        seq = self.detach_kv(request_id, owner)
        if seq is not None:
            self.kv.free(seq)
        return seq is not None

    def detach_kv(self, request_id: str, owner: Sequence | None = None) -> Sequence | None:
        """Take a held or reserved request off its id without freeing its blocks (the id may be reused at once,
        e.g. by a local prefill); the caller frees them with free_detached(seq) once nothing can write into them."""
        seq = self.scheduler.detach(request_id, owner)
        if seq is not None:
            self._forget(request_id)
        return seq

    def free_detached(self, seq: Sequence) -> None:
        """Free the blocks of a sequence that detach_kv took off its id (once nothing can write into them)."""
        self.kv.free(seq)

    # ---- disaggregation: decode side ----------------------------------------------------------------
    def reserve_import(self, seq: Sequence) -> list[int] | None:
        """Reserve blocks for a prompt whose KV will be imported; None if the pool is short."""
        return self.scheduler.reserve_import(seq)

    def commit_import(self, request_id: str, first_token_id: int, block_scores: torch.Tensor | None = None,
                      drafter_features: PromptFeatures | None = None) -> RequestOutput:
        """The KV bytes are in the reserved blocks: join the running batch and emit the prefill's first token.

        block_scores: the observation-window votes the prefill tier computed for this engine's eviction policy;
        drafter_features: what the prefill tier captured of the prompt for this engine's drafter (EAGLE-3).
        """
        seq = self.scheduler.reserved[request_id]
        if drafter_features is not None and self.speculator is not None:
            self.speculator.imported(request_id, drafter_features)
        self.eviction.track(seq, self.score_spec)
        self.eviction.imported(seq, block_scores, self.codec, self.kv_pages, self.device)
        if seq.generator is not None:
            # The prefill replica drew the first token's noise from this seed: skip that draw so a
            # seeded request continues exactly as it would have in one process.
            torch.empty(self.loaded.config.vocab_size).exponential_(generator=seq.generator)
        self.scheduler.commit_import(request_id)
        output = self.scheduler.append_token(seq, first_token_id, None)
        seq.prefill_done = True
        if output.finished:
            self._forget(request_id)
        else:
            self.eviction.evict_over_budget(seq)  # as a unified engine would right after the prefill step
        return output

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    @property
    def num_requests(self) -> int:
        return len(self.scheduler.requests)

    @property
    def num_evicted_blocks(self) -> int:
        return self.eviction.num_evicted_blocks

    def kv_stats(self) -> KVStats:
        return KVStats(num_blocks=self.pool.num_blocks, num_used_blocks=self.pool.num_used_blocks,
                       num_free_blocks=self.pool.num_free_blocks, block_size=self.block_size,
                       bytes_per_block=self._bytes_per_block, num_evicted_blocks=self.eviction.num_evicted_blocks)

    def moe_stats(self) -> dict[str, float] | None:
        """An MoE model's routing so far (None for a dense model): distinct experts per block, averaged over layers
        and blocks, and the busiest expert's share of its layer's tokens (1 / experts = perfectly even)."""
        layers = moe_stats(self.model)
        if not layers:
            return None
        blocks = sum(layer.num_blocks for layer in layers)
        busiest = [float(layer.expert_tokens.max()) / max(float(layer.expert_tokens.sum()), 1.0) for layer in layers]
        return {"distinct_experts_per_block": sum(layer.distinct_experts for layer in layers) / max(blocks, 1),
                "busiest_expert_share": max(busiest), "num_moe_layers": float(len(layers))}

    # ---- the loop -------------------------------------------------------------------------------
    def _forget(self, request_id: str) -> None:
        """The request left the engine: drop what the step hooks kept for it."""
        self.eviction.forget(request_id)
        if self.prompt_features is not None:
            self.prompt_features.forget(request_id)
        if self.speculator is not None:
            self.speculator.forget(request_id)

    def step(self) -> list[RequestOutput]:
        if self.speculator is not None:
            self.speculator.propose(self.scheduler.running)
        scheduler_output = self.scheduler.schedule()
        # Planned even when nothing runs: a step can preempt every running request and schedule none (blocks held
        # for export or reserved for imports), and plan drops the preempted requests' scores.
        model_input = self.eviction.plan(scheduler_output)
        if self._capture_layer_ids:
            model_input = dataclasses.replace(model_input, capture_layer_ids=self._capture_layer_ids)
        started = time.perf_counter()
        if self.expert_parallel is not None:
            # Every rank of the group steps together: this one may only serve its experts (idle pass).
            model_output = self.expert_parallel.step(not scheduler_output.is_empty,
                                                     lambda: self.runner.execute(model_input))
            if model_output is None:
                return []
        elif scheduler_output.is_empty:
            return []
        else:
            model_output = self.runner.execute(model_input)
        if self.speculator is not None:
            self.speculator.step_timed(scheduler_output.num_scheduled_tokens, time.perf_counter() - started,
                                       decode_only=not any(r.in_prefill for r in scheduler_output.scheduled))
        self.eviction.observe(model_input, model_output)
        if self.prompt_features is not None:
            self.prompt_features.observe(scheduler_output, model_output)
        if self.speculator is not None:
            self.speculator.observe(scheduler_output, model_output)
        outputs = self.scheduler.update(scheduler_output, model_output)
        for output in outputs:
            if output.finished and output.request_id not in self.scheduler.held:
                self._forget(output.request_id)
        self.eviction.after_update(scheduler_output)
        return outputs

    def close(self) -> None:
        """Leave the expert-parallel group (its peers re-form without this engine at once)."""
        if self.expert_parallel is not None:
            self.expert_parallel.close()

    # ---- convenience ----------------------------------------------------------------------------
    def generate(self, prompts: list[str] | list[list[int]], params: SamplingParams) -> list[Completion]:
        """Run prompts to completion (blocking); returns one Completion per prompt, in order."""
        request_ids = [f"generate-{time.monotonic_ns()}-{i}" for i in range(len(prompts))]
        for request_id, prompt in zip(request_ids, prompts):
            if isinstance(prompt, str):
                self.add_request(request_id, prompt=prompt, params=params)
            else:
                self.add_request(request_id, prompt_token_ids=prompt, params=params)
        completions = {request_id: Completion(request_id) for request_id in request_ids}
        while any(not c.finished for c in completions.values()):
            for output in self.step():
                if output.request_id in completions:
                    completions[output.request_id].add(output)
        return [completions[request_id] for request_id in request_ids]
