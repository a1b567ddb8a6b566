"""ServeConfig: the whole deployment in one validated record (YAML file or CLI flags).

Validated once at the top (pydantic: unknown keys and bad values are errors that name the field);
deployments receive plain values. Each decode tier has its own replicas / autoscaling and engine
overrides; the Router picks a tier by the request's hint, else by prompt length rules.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from workers.config import EngineConfig


class UnknownTierError(LookupError):
    """A request named a decode tier that is not configured (NOT_FOUND on the wire)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AutoscalingConfig(_Strict):
    """Ray Serve autoscaling for one deployment (its own; tiers scale apart)."""

    min_replicas: int = Field(1, ge=0, description="never fewer replicas than this (0 lets an idle tier go away)")
    max_replicas: int = Field(1, ge=1, description="never more replicas than this")
    initial_replicas: int | None = Field(None, ge=0, description="replicas at start-up; None = min_replicas")
    target_ongoing_requests: float = Field(8.0, gt=0, description="requests per replica Serve scales toward")
    upscale_delay_s: float = Field(10.0, ge=0, description="load must stay high this long before a replica is added")
    downscale_delay_s: float = Field(120.0, ge=0, description="load must stay low this long before one is removed")

    @model_validator(mode="after")
    def _bounds(self) -> "AutoscalingConfig":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) must be <= max_replicas ({self.max_replicas})")
        if self.initial_replicas is not None and not self.min_replicas <= self.initial_replicas <= self.max_replicas:
            raise ValueError("initial_replicas must lie within [min_replicas, max_replicas]")
        return self


class TierConfig(_Strict):
    """One deployment: the prefill tier or a decode tier."""

    name: str = Field(..., pattern=r"^[a-z][a-z0-9-]{0,30}$",
                      description="the tier's name: deployment DecodeServer-<name>, the requests' tier hint")
    num_replicas: int = Field(1, ge=1, description="fixed replica count when autoscaling is not set")
    autoscaling: AutoscalingConfig | None = Field(None, description="Serve autoscaling; None = num_replicas fixed")
    num_cpus: float = Field(0.5, ge=0, description="per replica; fractional so small machines fit (DESIGN §11)")
    num_gpus: float = Field(0.0, ge=0, description="per replica")
    max_ongoing_requests: int = Field(64, ge=1, description="per replica; beyond it requests queue or are refused")
    graceful_shutdown_timeout_s: float = Field(
        20.0, ge=0, description="a replica being removed (scale-down, redeploy) finishes its requests for at most "
                                "this long; streams still open then move to another replica")
    min_prompt_tokens: int = Field(0, ge=0, description="decode tiers: prompts at least this long route here")
    expert_parallel: int = Field(1, ge=1, description="decode tiers with an MoE model: this many replicas form one "
                                                      "expert-parallel group (each holds 1/N of every layer's "
                                                      "experts; num_replicas must equal it); 1 = off")
    engine: dict[str, Any] = Field(default_factory=dict, description="EngineConfig overrides for this tier")

    @model_validator(mode="after")
    def _engine_overrides_valid(self) -> "TierConfig":
        unknown = set(self.engine) - set(EngineConfig.model_fields)
        if unknown:
            raise ValueError(f"engine: unknown option(s) {sorted(unknown)}")
        if self.expert_parallel > 1 and (self.autoscaling is not None or self.num_replicas != self.expert_parallel):
            raise ValueError(f"expert_parallel: {self.expert_parallel} replicas form the group, so num_replicas must "
                             f"be {self.expert_parallel} and autoscaling unset (got num_replicas "
                             f"{self.num_replicas}, autoscaling {self.autoscaling is not None})")
        return self


def _default_decode_tiers() -> list[TierConfig]:
    # Long prompts go to a tier that keeps a quarter of each request's KV blocks (value-aware eviction: see
    # `tierserve eval longctx` for what that costs in quality, docs/eviction.md).
    long_engine = {"kv_eviction": {"policy": "value_aware", "budget": 0.25}}
    return [TierConfig(name="default"), TierConfig(name="long", min_prompt_tokens=2048, engine=long_engine)]


class ServeConfig(_Strict):
    """The whole deployment: the model, the tiers and the failure policy."""

    model: str | None = Field(None, description="GGUF file or HF directory; None = the default model")
    mode: Literal["disaggregated", "unified"] = Field(
        "disaggregated", description="disaggregated: a prefill tier hands KV to the decode tiers; unified: each "
                                     "decode tier also prefills")
    grpc_port: int = Field(9000, ge=1, le=65535, description="port of Serve's gRPC proxy (the API)")
    engine: EngineConfig = Field(default_factory=EngineConfig, description="defaults for every tier")
    prefill: TierConfig = Field(default_factory=lambda: TierConfig(name="prefill"),
                                description="the prefill tier (disaggregated mode)")
    decode_tiers: list[TierConfig] = Field(default_factory=_default_decode_tiers, min_length=1,
                                           description="one deployment each; a request goes to its hint, else to "
                                                       "the tier with the largest min_prompt_tokens it reaches")
    transfer_failure_policy: Literal["recompute", "fail"] = Field(
        "recompute", description="a failed or timed-out KV transfer: decode recomputes the prefill, or the "
                                 "request fails (UNAVAILABLE)")
    transfer_timeout_s: float = Field(10.0, gt=0, description="how long decode waits for a KV transfer")
    max_queued_requests: int = Field(256, ge=1, description="beyond this the Router answers RESOURCE_EXHAUSTED")
    max_migrations: int = Field(3, ge=0, description="times a stream may move to another decode replica")
    migration_timeout_s: float = Field(120.0, gt=0, description="how long a stream may wait for a live replica")
    migration_replay_max_tokens: int = Field(
        1024, ge=0, description="a migrated stream replays up to this many generated tokens one decode step each "
                                "(exactly the tokens an undisturbed run gives); longer ones are re-prefilled with the "
                                "prompt (one pass, may flip a near-tie)")

    @model_validator(mode="after")
    def _tiers_consistent(self) -> "ServeConfig":
        names = [tier.name for tier in self.decode_tiers]
        if len(set(names)) != len(names):
            raise ValueError(f"decode_tiers: tier names must be unique, got {names}")
        if self.prefill.name in names:
            raise ValueError(f"decode_tiers: {self.prefill.name!r} is the prefill tier's name")
        if not any(tier.min_prompt_tokens == 0 for tier in self.decode_tiers):
            raise ValueError("decode_tiers: one tier must take every prompt length (min_prompt_tokens: 0)")
        for tier in (self.prefill, *self.decode_tiers):
            self.engine_config(tier)  # merged engine options must validate too
        if self.prefill.expert_parallel > 1:
            raise ValueError("prefill.expert_parallel: expert parallelism is built for decode tiers")
        return self

    @classmethod
    def from_yaml(cls, path: str | Path) -> "ServeConfig":
        with open(path) as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: the top level must be a mapping of options")
        return cls.model_validate(data)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def engine_config(self, tier: TierConfig) -> EngineConfig:
        """The tier's engine: global engine defaults, the model, then the tier's overrides."""
        role = "prefill" if tier is self.prefill else ("unified" if self.mode == "unified" else "decode")
        merged = {**self.engine.model_dump(), "model": self.model or self.engine.model, "role": role, **tier.engine}
        return EngineConfig.model_validate(merged)

    def tier_for(self, num_prompt_tokens: int, hint: str = "") -> TierConfig:
        """The decode tier for a request: the hint if given (must exist), else the longest matching rule."""
        if hint:
            for tier in self.decode_tiers:
                if tier.name == hint:
                    return tier
            raise UnknownTierError(f"unknown decode tier {hint!r}; configured: "
                                   f"{', '.join(t.name for t in self.decode_tiers)}")
        eligible = [t for t in self.decode_tiers if t.min_prompt_tokens <= num_prompt_tokens]
        return max(eligible, key=lambda t: t.min_prompt_tokens)
