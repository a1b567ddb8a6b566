"""EngineConfig: validated once at the top; lower layers receive plain values."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class EvictionConfig(BaseModel):
    """KV eviction for long contexts (workers/kv/eviction.py): a policy and a per-sequence budget."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    policy: Literal["none", "streaming", "h2o", "snapkv", "value_aware"] = Field(
        "none", description="which blocks a sequence over its budget drops; none = keep every block")
    budget: float | None = Field(None, gt=0, le=1, description="keep at most this fraction of a sequence's blocks")
    budget_blocks: int | None = Field(None, ge=1, description="or at most this many blocks per sequence")
    sink_blocks: int = Field(1, ge=0, description="first blocks never evicted (attention sinks)")
    recent_blocks: int = Field(4, ge=1, description="last blocks never evicted (the local window)")
    observe_window: int = Field(32, ge=1, description="prompt queries whose attention scores blocks after prefill")
    value_norm: Literal["l1", "output"] = Field(
        "output", description="value_aware weighting: ||W_O v||_2 (effect on the output, CriticalKV) or ||v||_1 "
                              "(VATP); measured: docs/eviction.md")
    aggregate: Literal["sum", "max"] = Field(
        "max", description="combine (layer, KV head) votes: the largest share any one gives, or the total")

    @model_validator(mode="after")
    def _budget_given(self) -> "EvictionConfig":
        if self.policy != "none" and self.budget is None and self.budget_blocks is None:
            raise ValueError(f"kv_eviction: policy {self.policy!r} needs a budget (fraction) or budget_blocks")
        if self.budget_blocks is not None and self.budget_blocks < self.sink_blocks + self.recent_blocks:
            raise ValueError(f"kv_eviction: budget_blocks ({self.budget_blocks}) must cover sink_blocks + "
                             f"recent_blocks ({self.sink_blocks + self.recent_blocks})")
        return self


class SpeculativeConfig(BaseModel):
    """Speculative decoding in decode and unified engines (workers/spec): a drafter proposes, the target verifies
    in one pass; greedy output is identical to plain decoding and sampling keeps the target distribution."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal["none", "ngram", "draft_model", "eagle3"] = Field(
        "none", description="the drafter: ngram = prompt lookup (no weights); draft_model = a smaller model with "
                            "the target's vocabulary (draft_model), its own paged KV in the same replica; eagle3 "
                            "= an EAGLE-3 head over the target's hidden states (eagle_head)")
    draft_model: str | None = Field(None, description="draft_model: GGUF file, HF directory or registry name")
    draft_kv_cache_memory_mb: int = Field(256, ge=1, description="draft_model: the draft model's KV pool")
    eagle_head: str | None = Field(None, description="eagle3: a head directory (config.json + model.safetensors, "
                                                     "vLLM/SGLang layout); None = the one `tierserve train-drafter "
                                                     "eagle3` cached for this model")
    num_speculative_tokens: int = Field(4, ge=1, le=16, description="drafts per step at most, per request")
    ngram_max: int = Field(4, ge=1, description="ngram: the longest suffix looked up in the context")
    ngram_min: int = Field(2, ge=1, description="ngram: the shortest suffix that may propose")
    tree_width: int = Field(1, ge=1, le=8, description="alternatives per draft position: 1 = a chain; more = a "
                                                       "token tree verified in the same pass (ngram: that many "
                                                       "earlier matches merged; eagle3: top-k children per "
                                                       "node, EAGLE-2's dynamic tree; num_speculative_tokens is "
                                                       "the tree's node budget)")
    policy: Literal["cost", "fixed"] = Field(
        "cost", description="how many drafts: cost = each request's acceptance rate against the step cost fitted "
                            "online (drafts only while they raise tokens per second); fixed = always "
                            "num_speculative_tokens")
    row_cost_prior: float = Field(0.3, ge=0, description="cost: what one more row costs, as a fraction of a "
                                                         "one-row decode step, until decode steps have been timed")
    max_batch_size: int = Field(32, ge=0, description="no drafting while more requests than this run (a guard "
                                                      "above the cost policy)")

    @model_validator(mode="after")
    def _ngram_range(self) -> "SpeculativeConfig":
        if self.ngram_min > self.ngram_max:
            raise ValueError(f"speculative: ngram_min ({self.ngram_min}) must be <= ngram_max ({self.ngram_max})")
        if self.method == "draft_model" and not self.draft_model:
            raise ValueError("speculative: method draft_model needs draft_model (a model path or name)")
        if self.tree_width > 1 and self.method not in ("ngram", "eagle3"):
            raise ValueError(f"speculative: tree_width > 1 is built for ngram and eagle3; {self.method} drafts a "
                             f"chain")
        return self


class MoERoutingConfig(BaseModel):
    """How an MoE model's routers choose (workers/moe/router.py); no effect on a dense model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    block_size: int = Field(0, ge=0, description="dMoE block routing: blocks of this many consecutive tokens of a "
                                                 "step (prefill chunks, decode batches, verification trees) share a "
                                                 "coreset of experts; 0 = off (each token routes freely)")
    coreset_threshold: float = Field(0.9, gt=0, le=1, description="dMoE: the share of a block's summed top-k "
                                                                  "router weight its coreset keeps")


class ExpertParallelConfig(BaseModel):
    """How an expert-parallel engine behaves in its group (the group's size is the decode tier's
    `expert_parallel`; workers/moe/expert_parallel.py)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    timeout_s: float = Field(30.0, gt=0, description="a collective waiting longer than this (a hung peer) drops "
                                                     "the group, which re-forms without that peer")
    rebalance_interval_steps: int = Field(256, ge=0, description="EPLB: every this many steps with work, the "
                                                                 "measured expert loads re-place the experts; 0 = "
                                                                 "never")
    rebalance_min_gain: float = Field(0.05, ge=0, description="EPLB: move experts only if the busiest rank's load "
                                                              "over the mean drops by at least this much")
    regroup_grace_s: float = Field(10.0, gt=0, description="after losing a member, the survivors wait this long "
                                                           "for it (or all of the tier) before going on without it")
    idle_poll_ms: float = Field(5.0, gt=0, description="an idle group agrees this often whether a rank has work "
                                                       "(the most a new request waits for its first step)")


class EngineConfig(BaseModel):
    """One engine (one replica's, or `tierserve run`'s): the model, the KV cache and the step budget."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str | None = Field(None, description="GGUF file, HF directory or registry name (`tierserve models list`); "
                                                 "None = the default SmolLM2-135M GGUF")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="weights/activations; auto = bfloat16 on CUDA, float32 on CPU")
    device: str = Field("auto", description="auto = cuda if available else cpu")
    kv_codec: str = Field("auto", description="KV page format: auto (the model dtype), float16, bfloat16, int8, "
                                             "tq-k<b>v<b>[+qjl] (TurboQuant; fractional bits = outlier channels, "
                                             "need kv_calibration), gtq-<bits> (Block-GTQ, needs kv_calibration)")
    kv_calibration: str | None = Field(None, description="calibration file for gtq-* and fractional tq-* codecs "
                                                         "(tierserve calibrate)")
    kv_exclude_layers: tuple[int, ...] = Field((), description="layers kept in fp16 by a quantized codec")
    block_size: int = Field(16, ge=1, le=256, description="tokens per KV block (a power of two)")
    num_kv_blocks: int | None = Field(None, ge=1, description="pool size; None = derived from kv_cache_memory_mb")
    kv_cache_memory_mb: int = Field(512, ge=1, description="KV pool budget when num_kv_blocks is not given")
    max_model_len: int | None = Field(None, ge=2, description="context window; None = the model's")
    max_num_seqs: int = Field(64, ge=1, description="running sequences per step")
    max_num_batched_tokens: int = Field(512, ge=1, description="token budget per step (chunked prefill)")
    enable_prefix_caching: bool = Field(True, description="reuse the KV blocks of a shared prompt prefix across "
                                                          "requests")
    num_threads: int | None = Field(None, ge=1, description="torch CPU threads; None = leave torch's default")
    pack_cpu_weights: bool = Field(True, description="float32 on CPU: pack each weight once for MKL's GEMM "
                                                     "(a 32-stream decode step ~16% faster, measured; about one "
                                                     "more copy of the weights in memory)")
    block_quant_linears: bool = Field(True, description="float32 on CPU with a GGUF model: batches of up to 64 rows "
                                                        "multiply by the file's Q4_0/Q4_1/Q4_K/Q5_0/Q6_K/Q8_0 "
                                                        "blocks (dequantized exactly in the native kernel) instead "
                                                        "of the fp32 copies; like packing, it changes a shared model "
                                                        "for every engine")
    native_decode_layers: bool = Field(True, description="float32 on CPU with block-quantized linears: a pure-decode "
                                                          "step runs all its layers in one native call (the same "
                                                          "kernels as the module path, bit-identical, without the "
                                                          "Python between them)")
    freeze_gc_heap: bool = Field(True, description="after the process's first engine starts, freeze its long-lived "
                                                   "objects out of Python's cyclic GC (full collections stop "
                                                   "rescanning the model and tokenizer every few steps)")
    role: Literal["unified", "prefill", "decode"] = Field(
        "unified", description="set by the deployment: a prefill or decode tier's engine, or both in one (unified)")
    kv_eviction: EvictionConfig = Field(default_factory=EvictionConfig,
                                        description="long-context KV eviction (decode and unified roles)")
    moe_routing: MoERoutingConfig = Field(default_factory=MoERoutingConfig,
                                          description="MoE models: dMoE block routing")
    speculative: SpeculativeConfig = Field(default_factory=SpeculativeConfig,
                                           description="speculative decoding (decode and unified roles)")
    expert_parallel: ExpertParallelConfig = Field(default_factory=ExpertParallelConfig,
                                                  description="MoE models in an expert-parallel decode tier")

    @field_validator("kv_codec")
    @classmethod
    def _known_codec(cls, value: str) -> str:
        from workers.kv.presets import check_codec_name

        return check_codec_name(value)

    @model_validator(mode="after")
    def _calibrated_codec_has_a_file(self) -> "EngineConfig":
        from workers.kv.presets import needs_calibration

        if needs_calibration(self.kv_codec) and not self.kv_calibration:
            raise ValueError(f"kv_codec {self.kv_codec!r} needs kv_calibration (a file from `tierserve calibrate`)")
        return self

    @field_validator("block_size")
    @classmethod
    def _power_of_two(cls, value: int) -> int:
        if value & (value - 1):
            raise ValueError(f"block_size must be a power of two, got {value}")
        return value

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def resolved_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if self.resolved_device().type == "cuda" else torch.float32
        return _DTYPES[self.dtype]
