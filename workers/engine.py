"""Engine: add_request / step / abort over the scheduler, the model runner and the sampler.

Data flows one way: request -> Sequence -> Scheduler.schedule() -> ModelRunner -> sampler ->
Engine._postprocess (append tokens, publish full blocks, stop checks) -> RequestOutput.
No Ray here: a plain process can own an Engine (tests, benchmarks, `tierserve run`).
"""

from __future__ import annotations

import atexit
import functools
import gc
import logging
import secrets
import time
from dataclasses import dataclass, field

import torch

from workers.config import EngineConfig
from workers.kv.block_pool import BlockPool
from workers.kv.block_scores import ScoreSpec, TokenWeightStore, output_maps
from workers.kv.calibration import KVCalibration
from workers.kv.codecs import KVCodec
from workers.kv.eviction import EvictionBudget, EvictionCandidate, EvictionPolicy, make_eviction_policy
from workers.kv.presets import make_codec
from workers.kv.manager import KVCacheManager
from workers.model.loader import LoadedModel, load_model
from workers.model.block_quant_linear import quantize_linears
from workers.model.packed_linear import pack_linears
from workers.model_runner import ModelOutput, ModelRunner
from workers.outputs import RequestOutput, TextState
from workers.sampler import sample
from workers.sampling_params import InvalidRequestError, SamplingParams
from workers.scheduler import Scheduler
from workers.sequence import FinishReason, Sequence, TokenLogprobs

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class HeldKV:
    """A prefilled request's KV, kept for a decode replica to pull (prefill role)."""

    request_id: str
    block_ids: tuple[int, ...]
    num_tokens: int  # tokens whose K/V the blocks hold (the prompt)
    first_token_id: int
    block_scores: torch.Tensor | None = None  # [V, blocks] observation-window votes, when the decode tier asked
    num_cached_tokens: int = 0  # prompt tokens this replica's prefix cache served


@dataclass(frozen=True)
class KVStats:
    num_blocks: int
    num_used_blocks: int
    num_free_blocks: int
    block_size: int
    bytes_per_block: int
    num_evicted_blocks: int  # lifetime count of blocks dropped by the eviction policy


@functools.cache
def freeze_gc_heap() -> None:
    """Move everything alive now (model, tokenizer, pools: the process's long-lived heap) out of the cyclic GC's
    reach, once per process (the first engine). A decode step allocates thousands of small objects, so the GC runs
    often, and each full collection rescanned that whole heap: ~17% of a 32-stream step on 2 cores (measured). vLLM
    does the same at start. Frozen objects are still freed by reference counting; only cycles among them would
    outlive their use, which is why this happens once, not per engine."""
    gc.collect()
    gc.freeze()
    # Frozen objects are never finalized at shutdown otherwise (bindings such as triton's then report "leaks").
    atexit.register(gc.unfreeze)


class Engine:
    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None):
        self.config = config
        if config.num_threads is not None:
            torch.set_num_threads(config.num_threads)
        self.device = config.resolved_device()
        dtype = config.resolved_dtype()
        self.loaded = loaded or load_model(config.model, dtype=dtype, device=self.device)
        self.model = self.loaded.model
        if config.block_quant_linears:
            quantize_linears(self.model, self.loaded.block_tensors)  # in place, once, like the packing below
        if config.pack_cpu_weights:
            pack_linears(self.model)  # fp32 CPU linears only; in place, once: a shared model is packed for all
        self.tokenizer = self.loaded.tokenizer
        model_config = self.loaded.config
        calibration = KVCalibration.load(config.kv_calibration) if config.kv_calibration else None
        self.codec: KVCodec = make_codec(
            config.kv_codec, model_dtype=self.model.dtype, num_layers=model_config.num_layers,
            num_kv_heads=model_config.num_kv_heads, head_dim=model_config.head_dim, device=self.device,
            calibration=calibration, exclude_layers=tuple(config.kv_exclude_layers))
        self.block_size = config.block_size
        self._init_eviction(config, model_config)
        # Value weights (value-aware eviction) live beside the pages and cost memory like them.
        weight_bytes_per_token = TokenWeightStore.bytes_per_token(model_config.num_layers, model_config.num_kv_heads) \
            if self.weighting != "none" else 0
        bytes_per_block = (sum(self.codec.bytes_per_token(layer) for layer in range(model_config.num_layers))
                           + weight_bytes_per_token) * self.block_size
        num_blocks = config.num_kv_blocks or max(1, config.kv_cache_memory_mb * 2**20 // bytes_per_block)
        self.kv_pages = [self.codec.allocate(layer, num_blocks, self.block_size, self.device)
                         for layer in range(model_config.num_layers)]
        self.pool = BlockPool(num_blocks, enable_prefix_caching=config.enable_prefix_caching)
        self.kv = KVCacheManager(self.pool, self.block_size)
        self.scheduler = Scheduler(self.kv, config.max_num_seqs, config.max_num_batched_tokens)
        self.weight_store = None
        if self.weighting != "none":
            self.weight_store = TokenWeightStore(self.weighting, model_config.num_layers, num_blocks, self.block_size,
                                                 model_config.num_kv_heads, self.device, self._output_maps)
        self.runner = ModelRunner(self.model, self.codec, self.kv_pages, self.block_size,
                                  weight_store=self.weight_store, output_maps=self._output_maps,
                                  native_decode=config.native_decode_layers)
        # A lone sequence must always fit in the pool, or it could wait forever.
        self.max_model_len = min(config.max_model_len or model_config.max_position_embeddings,
                                 model_config.max_position_embeddings, num_blocks * self.block_size)
        self._bytes_per_block = bytes_per_block
        self._sequences: dict[str, Sequence] = {}
        self._text: dict[str, TextState] = {}
        self._held: dict[str, tuple[Sequence, HeldKV]] = {}  # prefill role: blocks awaiting export
        self._importing: dict[str, Sequence] = {}  # decode role: blocks reserved, bytes in flight
        self.eos_token_ids = frozenset(self.tokenizer.stop_token_ids)
        if config.freeze_gc_heap:
            freeze_gc_heap()  # last: everything the engine keeps for its lifetime exists by now

    def _init_eviction(self, config: EngineConfig, model_config) -> None:
        """The eviction policy and what feeds its scores. A prefill replica never evicts (it hands over the whole
        prompt) but computes the observation-window votes a decode tier asks for, so it keeps the output maps."""
        eviction = config.kv_eviction
        budget = EvictionBudget(fraction=eviction.budget, max_blocks=eviction.budget_blocks,
                                sink_blocks=eviction.sink_blocks, recent_blocks=eviction.recent_blocks)
        self.eviction: EvictionPolicy = make_eviction_policy(
            "none" if config.role == "prefill" else eviction.policy, budget, eviction.observe_window,
            eviction.value_norm, eviction.aggregate)
        self.score_spec: ScoreSpec | None = self.eviction.score_spec
        self.weighting = self.score_spec.weighting if self.score_spec is not None else "none"
        self._output_maps = None
        if config.role == "prefill" or self.weighting == "output":
            self._output_maps = output_maps([layer.self_attn.o_proj.weight for layer in self.model.layers],
                                            model_config.num_kv_heads, model_config.head_dim)
        self.num_evicted_blocks = 0

    # ---- requests -------------------------------------------------------------------------------
    def make_sequence(self, request_id: str, prompt: str | None = None, prompt_token_ids: list[int] | None = None,
                      params: SamplingParams | None = None, hold_kv: bool = False,
                      score_spec: ScoreSpec | None = None) -> Sequence:
        """Validate and tokenize a request (no engine state touched: safe from any thread).

        score_spec: block scores a decode tier wants computed here (prefill role); otherwise the engine's own.
        """
        params = params or SamplingParams()
        if not request_id:
            raise InvalidRequestError("request_id", "must be a non-empty string")
        if prompt_token_ids is None:
            if not isinstance(prompt, str) or not prompt:
                raise InvalidRequestError("prompt", "must be a non-empty string (or give prompt_token_ids)")
            prompt_token_ids = self.tokenizer.encode(prompt)
        prompt_token_ids = list(prompt_token_ids)
        if not prompt_token_ids:
            raise InvalidRequestError("prompt_token_ids", "must not be empty")
        vocab_size = self.loaded.config.vocab_size
        for field_name, token_ids in (("prompt_token_ids", prompt_token_ids),
                                      ("forced_token_ids", params.forced_token_ids)):
            bad = [t for t in token_ids if not isinstance(t, int) or not 0 <= t < vocab_size]
            if bad:
                raise InvalidRequestError(field_name,
                                          f"token id {bad[0]!r} is outside the vocabulary [0, {vocab_size})")
        if len(prompt_token_ids) >= self.max_model_len:
            raise InvalidRequestError(
                "prompt", f"prompt has {len(prompt_token_ids)} tokens; the context window is {self.max_model_len} "
                          f"(prompt + at least one generated token must fit)")
        generator = None
        if not params.is_greedy:
            generator = torch.Generator().manual_seed(params.seed if params.seed is not None else secrets.randbits(63))
        return Sequence(request_id=request_id, prompt_token_ids=prompt_token_ids, params=params,
                        arrival_time=time.monotonic(), eos_token_ids=self.eos_token_ids, generator=generator,
                        hold_kv=hold_kv, score_spec=score_spec or self.score_spec)

    def add_sequence(self, seq: Sequence) -> None:
        self._check_new_id(seq.request_id)
        self._sequences[seq.request_id] = seq
        self._text[seq.request_id] = TextState(self.tokenizer, seq.prompt_token_ids, seq.params)
        self.scheduler.add(seq)

    def add_request(self, request_id: str, prompt: str | None = None, prompt_token_ids: list[int] | None = None,
                    params: SamplingParams | None = None) -> None:
        self.add_sequence(self.make_sequence(request_id, prompt, prompt_token_ids, params))

    def _check_new_id(self, request_id: str) -> None:
        if request_id in self._sequences or request_id in self._held or request_id in self._importing:
            raise InvalidRequestError("request_id", f"request {request_id!r} is already running")

    def abort(self, request_id: str) -> RequestOutput | None:
        """Cancel a request wherever it is: queued, running, held for export or mid-import."""
        if request_id in self._held or request_id in self._importing:
            self.release_kv(request_id)
            return None
        seq = self._sequences.get(request_id)
        if seq is None:
            return None
        return self._finish(seq, FinishReason.ABORT, [], "", [])

    # ---- disaggregation: prefill side ---------------------------------------------------------------
    def held_kv(self, request_id: str) -> HeldKV | None:
        entry = self._held.get(request_id)
        return entry[1] if entry else None

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
        e.g. by a local prefill); the caller frees them with kv.free(seq) once nothing can write into them."""
        entry = self._held.get(request_id)
        seq = entry[0] if entry else self._importing.get(request_id)
        if seq is None or (owner is not None and seq is not owner):
            return None
        if entry:
            del self._held[request_id]
        else:
            del self._importing[request_id]
        return seq

    def free_detached(self, seq: Sequence) -> None:
        """Free the blocks of a sequence that detach_kv took off its id (once nothing can write into them)."""
        self.kv.free(seq)

    # ---- disaggregation: decode side ----------------------------------------------------------------
    def reserve_import(self, seq: Sequence) -> list[int] | None:
        """Reserve blocks for a prompt whose KV will be imported; None if the pool is short."""
        self._check_new_id(seq.request_id)
        if not self.kv.allocate_slots(seq, seq.num_prompt_tokens):
            return None
        self._importing[seq.request_id] = seq
        return list(seq.block_table)

    def commit_import(self, request_id: str, first_token_id: int,
                      block_scores: torch.Tensor | None = None) -> RequestOutput:
        """The KV bytes are in the reserved blocks: join the running batch and emit the prefill's first token.

        block_scores: the observation-window votes the prefill tier computed for this engine's eviction policy.
        """
        seq = self._importing.pop(request_id)
        if block_scores is not None and seq.score_spec is not None:
            seq.block_scores = block_scores.float().cpu()
        if self.weight_store is not None:
            # Value weights are written with the K/V; imported pages were written elsewhere, so derive them from
            # the decoded pages once, here.
            block_ids = torch.tensor(seq.block_table, dtype=torch.long, device=self.device)
            for layer, pages in enumerate(self.kv_pages):
                self.weight_store.write_blocks(layer, seq.block_table, self.codec.gather(pages, block_ids)[1])
        if seq.generator is not None:
            # The prefill replica drew the first token's noise from this seed: skip that draw so a
            # seeded request continues exactly as it would have in one process.
            torch.empty(self.loaded.config.vocab_size).exponential_(generator=seq.generator)
        seq.num_computed_tokens = seq.num_prompt_tokens
        self.kv.cache_full_blocks(seq)
        self._sequences[request_id] = seq
        self._text[request_id] = TextState(self.tokenizer, seq.prompt_token_ids, seq.params)
        self.scheduler.add_running(seq)
        output = self._postprocess(seq, first_token_id, None)
        seq.prefill_done = True
        self._evict_over_budget(seq)  # as a unified engine would right after the prefill step
        return output

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    @property
    def num_requests(self) -> int:
        return len(self._sequences)

    def kv_stats(self) -> KVStats:
        return KVStats(num_blocks=self.pool.num_blocks, num_used_blocks=self.pool.num_used_blocks,
                       num_free_blocks=self.pool.num_free_blocks, block_size=self.block_size,
                       bytes_per_block=self._bytes_per_block, num_evicted_blocks=self.num_evicted_blocks)

    # ---- the loop -------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        scheduled = self.scheduler.schedule()
        if scheduled.is_empty:
            return []
        model_output = self.runner.execute(scheduled.scheduled)
        if model_output.scores is not None:
            self._add_votes(model_output)
        for item in scheduled.scheduled:
            seq = item.seq
            seq.num_computed_tokens += item.num_new_tokens
            seq.prefill_done = seq.num_computed_tokens == seq.num_tokens
            self.kv.cache_full_blocks(seq)
        seqs = model_output.sampled_seqs
        sampled = sample(model_output.logits, [s.params for s in seqs], [s.generator for s in seqs],
                         [s.forced_next_token for s in seqs])
        outputs = [self._postprocess(seq, token_id, logprobs)
                   for seq, token_id, logprobs in zip(seqs, sampled.token_ids, sampled.logprobs)]
        for item in scheduled.scheduled:
            self._evict_over_budget(item.seq)
        return outputs

    def _add_votes(self, model_output: ModelOutput) -> None:
        """Fold the step's attention by-products into the sequences' block scores."""
        scores = model_output.scores
        for chunk_index, seq in model_output.observed_seqs.items():
            _add_to_scores(seq, scores.observed(chunk_index).cpu())
        if scores.decode_mass is None:
            return
        decode_mass = scores.decode_mass.cpu()
        for row, seq in enumerate(model_output.decode_seqs):
            # Decode rows are true decodes here: the runner sends a scored sequence's prefill through the prefill path.
            if seq.score_spec is not None and seq.score_spec.accumulate_decode:
                _add_to_scores(seq, decode_mass[row, :, :len(seq.block_table)])

    def _evict_over_budget(self, seq: Sequence) -> None:
        """Evict once prefill is done (the window has voted and a token was sampled), while the sequence runs."""
        if seq.is_finished or seq.hold_kv or not seq.prefill_done:
            return
        table = seq.block_table
        num_evicted_blocks = seq.num_evicted_tokens // self.block_size
        # Checked first: under budget (most steps), no candidate is built (its shared flags walk the whole table).
        if self.eviction.num_over_budget(len(table), num_evicted_blocks) <= 0:
            return
        candidate = EvictionCandidate(
            request_id=seq.request_id, num_blocks=len(table), num_evicted_blocks=num_evicted_blocks,
            shared=tuple(self.kv.is_shared(block) for block in table),
            scores=_fit(seq.block_scores, len(table)) if seq.block_scores is not None else None)
        indices = self.eviction.select(candidate)
        if indices:
            self.kv.evict(seq, indices)
            self.num_evicted_blocks += len(indices)

    def _postprocess(self, seq: Sequence, token_id: int, logprobs: TokenLogprobs | None) -> RequestOutput:
        seq.output_token_ids.append(token_id)
        params = seq.params
        logprob_list = [logprobs] if logprobs is not None else []
        if token_id in params.stop_token_ids or (not params.ignore_eos and token_id in seq.eos_token_ids):
            return self._finish(seq, FinishReason.STOP, [token_id], "", logprob_list)
        text_delta, hit_stop_string = self._text[seq.request_id].add_token(token_id)
        if hit_stop_string:
            return self._finish(seq, FinishReason.STOP, [token_id], text_delta, logprob_list)
        if seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            return self._finish(seq, FinishReason.LENGTH, [token_id], text_delta, logprob_list)
        return self._output(seq, [token_id], text_delta, logprob_list, finished=False)

    def _finish(self, seq: Sequence, reason: FinishReason, new_token_ids: list[int], text_delta: str,
                logprobs: list[TokenLogprobs]) -> RequestOutput:
        seq.finish_reason = reason
        hold = seq.hold_kv and reason is not FinishReason.ABORT
        self.scheduler.finish(seq, free_blocks=not hold)
        if hold:
            # The blocks hold the prompt's K/V (the sampled token is not computed yet).
            scores = seq.block_scores.clone() if seq.block_scores is not None else None
            self._held[seq.request_id] = (seq, HeldKV(seq.request_id, tuple(seq.block_table), seq.num_prompt_tokens,
                                                      seq.output_token_ids[-1], scores, seq.num_cached_tokens))
        text_state = self._text.pop(seq.request_id)
        if reason is not FinishReason.STOP or not seq.params.stop:
            text_delta += text_state.finish()
        del self._sequences[seq.request_id]
        return self._output(seq, new_token_ids, text_delta, logprobs, finished=True)

    def _output(self, seq, new_token_ids, text_delta, logprobs, finished: bool) -> RequestOutput:
        return RequestOutput(
            request_id=seq.request_id, new_token_ids=new_token_ids, new_text=text_delta, finished=finished,
            finish_reason=seq.finish_reason, num_prompt_tokens=seq.num_prompt_tokens,
            num_cached_tokens=seq.num_cached_tokens, num_output_tokens=seq.num_output_tokens, logprobs=logprobs)

    # ---- convenience ----------------------------------------------------------------------------
    def generate(self, prompts: list[str] | list[list[int]], params: SamplingParams) -> list["Completion"]:
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


def _add_to_scores(seq: Sequence, votes: torch.Tensor) -> None:
    """votes [V, nb] over the sequence's first nb held blocks."""
    previous = seq.block_scores
    if previous is None:
        seq.block_scores = votes.clone()
    else:
        length = max(previous.shape[-1], votes.shape[-1])
        seq.block_scores = _fit(previous, length) + _fit(votes, length)


def _fit(scores: torch.Tensor, length: int) -> torch.Tensor:
    """Scores [V, n] padded with zeros (blocks written since the last vote) or cut to `length` blocks."""
    if scores.shape[-1] >= length:
        return scores[:, :length]
    return torch.cat([scores, scores.new_zeros(scores.shape[0], length - scores.shape[-1])], dim=-1)


@dataclass
class Completion:
    """A whole request's result, folded from its RequestOutputs."""

    request_id: str
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finished: bool = False
    finish_reason: FinishReason | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    logprobs: list[TokenLogprobs] = field(default_factory=list)

    def add(self, output: RequestOutput) -> None:
        self.token_ids.extend(output.new_token_ids)
        self.text += output.new_text
        self.logprobs.extend(output.logprobs)
        self.finished = output.finished
        self.finish_reason = output.finish_reason
        self.num_prompt_tokens = output.num_prompt_tokens
        self.num_cached_tokens = output.num_cached_tokens
