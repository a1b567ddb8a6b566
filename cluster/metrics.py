"""Prometheus metrics through Ray's metrics agent (scraped from each node's metrics export port).

Names are prefixed `tierserve_`; every series carries the tier. What an on-call engineer needs when
autoscaling misbehaves: latency (TTFT, inter-token), queue depth and running requests, KV blocks
used/free/evicted per tier, KV transfer bytes/seconds/failures, and stream migrations.
"""

from __future__ import annotations

import threading
import time

from ray.util import metrics

LATENCY_BUCKETS_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]


class RouterMetrics:
    def __init__(self):
        self.ttft = metrics.Histogram("tierserve_ttft_seconds", "request arrival to first token",
                                      boundaries=LATENCY_BUCKETS_S, tag_keys=("tier",))
        self.inter_token = metrics.Histogram("tierserve_inter_token_latency_seconds", "gap between streamed chunks",
                                             boundaries=LATENCY_BUCKETS_S, tag_keys=("tier",))
        self.queue_depth = metrics.Gauge("tierserve_router_requests_in_flight", "requests admitted, not finished")
        self.migrations = metrics.Counter("tierserve_migrations_total", "streams moved to another decode replica",
                                          tag_keys=("tier",))
        self.rejected = metrics.Counter("tierserve_requests_rejected_total", "requests refused, by gRPC status",
                                        tag_keys=("code",))


class EngineMetrics:
    """Gauges sampled from the engine once a second by a daemon thread (never on the step path)."""

    def __init__(self, tier: str, role: str, engine, period_s: float = 1.0):
        tags = {"tier": tier, "role": role}
        self._tags = tags
        self.blocks_used = metrics.Gauge("tierserve_kv_blocks_used", "KV blocks in use", tag_keys=("tier", "role"))
        self.blocks_free = metrics.Gauge("tierserve_kv_blocks_free", "KV blocks free", tag_keys=("tier", "role"))
        self.running = metrics.Gauge("tierserve_running_requests", "requests in the engine", tag_keys=("tier", "role"))
        self.transfer_bytes = metrics.Counter("tierserve_kv_transfer_bytes_total", "encoded KV bytes moved",
                                              tag_keys=("tier", "role"))
        self.transfer_seconds = metrics.Histogram("tierserve_kv_transfer_seconds", "KV handoff time",
                                                  boundaries=LATENCY_BUCKETS_S, tag_keys=("tier", "role"))
        self.transfer_failures = metrics.Counter("tierserve_kv_transfer_failures_total", "failed KV handoffs",
                                                 tag_keys=("tier", "role"))
        # A counter fed from the engine's lifetime count: the sampler adds what was evicted since its last look.
        self.blocks_evicted = metrics.Counter("tierserve_kv_blocks_evicted_total",
                                              "KV blocks dropped by the eviction policy", tag_keys=("tier", "role"))
        self._evicted_seen = 0
        # Speculative decoding, fed the same way from the engine's SpecStats: acceptance = accepted / draft tokens,
        # tokens per verify pass = emitted / passes (dashboards divide the rates).
        self.spec_counters = {
            name: metrics.Counter(f"tierserve_spec_{name}_total", help_text, tag_keys=("tier", "role"))
            for name, help_text in (("verify_passes", "request-steps that verified drafts"),
                                    ("draft_tokens", "draft tokens verified"),
                                    ("accepted_tokens", "draft tokens accepted"),
                                    ("emitted_tokens", "tokens emitted by verify passes"))}
        self._spec_seen = dict.fromkeys(self.spec_counters, 0)
        # MoE models: how many distinct experts a block of tokens uses (dMoE's measure) and the busiest expert's share
        self.moe_distinct = metrics.Gauge("tierserve_moe_distinct_experts_per_block",
                                          "mean distinct experts per block of tokens, over MoE layers",
                                          tag_keys=("tier", "role"))
        self.moe_busiest = metrics.Gauge("tierserve_moe_busiest_expert_share",
                                         "the busiest expert's share of its layer's routed tokens",
                                         tag_keys=("tier", "role"))
        # Expert-parallel tiers: the group's epoch and size (a changed epoch = a regroup), the all-to-all traffic,
        # and the busiest rank's expert load over the mean (what EPLB rebalancing drives toward 1)
        self.ep_gauges = {name: metrics.Gauge(f"tierserve_ep_{name}", help_text, tag_keys=("tier", "role"))
                          for name, help_text in (("epoch", "expert-parallel group epoch (bumps on every regroup)"),
                                                  ("world_size", "replicas in the expert-parallel group"),
                                                  ("imbalance", "busiest rank's expert load over the mean"))}
        self.ep_counters = {name: metrics.Counter(f"tierserve_ep_{name}_total", help_text, tag_keys=("tier", "role"))
                            for name, help_text in (("all_to_all_bytes", "bytes sent to other ranks by dispatch "
                                                                         "and combine"),
                                                    ("routed_tokens", "tokens through MoE layers (summed over "
                                                                      "layers)"),
                                                    ("regroups", "expert-parallel group re-formed"),
                                                    ("rebalances", "EPLB placements applied"))}
        self._ep_seen = dict.fromkeys(self.ep_counters, 0)
        self._engine = engine
        self._period_s = period_s
        threading.Thread(target=self._sample_forever, name="tierserve-metrics", daemon=True).start()

    def record_transfer(self, nbytes: int, seconds: float) -> None:
        self.transfer_bytes.inc(nbytes, tags=self._tags)
        self.transfer_seconds.observe(seconds, tags=self._tags)

    def record_transfer_failure(self) -> None:
        self.transfer_failures.inc(1, tags=self._tags)

    def _sample_forever(self) -> None:
        while True:
            pool = self._engine.pool
            self.blocks_used.set(pool.num_used_blocks, tags=self._tags)
            self.blocks_free.set(pool.num_free_blocks, tags=self._tags)
            self.running.set(self._engine.num_requests, tags=self._tags)
            evicted = self._engine.num_evicted_blocks
            if evicted > self._evicted_seen:
                self.blocks_evicted.inc(evicted - self._evicted_seen, tags=self._tags)
                self._evicted_seen = evicted
            speculator = getattr(self._engine, "speculator", None)
            if speculator is not None:
                self._add_spec(speculator.stats)
            moe = self._engine.moe_stats() if hasattr(self._engine, "moe_stats") else None
            if moe is not None:
                self.moe_distinct.set(moe["distinct_experts_per_block"], tags=self._tags)
                self.moe_busiest.set(moe["busiest_expert_share"], tags=self._tags)
            ep = getattr(self._engine, "expert_parallel", None)
            if ep is not None:
                self._add_ep(ep.stats)
            time.sleep(self._period_s)

    def _add_ep(self, stats) -> None:
        for name, gauge in self.ep_gauges.items():
            gauge.set(float(getattr(stats, name)), tags=self._tags)
        for name, counter in self.ep_counters.items():
            value = getattr(stats, name)
            if value > self._ep_seen[name]:
                counter.inc(value - self._ep_seen[name], tags=self._tags)
                self._ep_seen[name] = value

    def _add_spec(self, stats) -> None:
        for name, counter in self.spec_counters.items():
            value = getattr(stats, f"num_{name}")
            if value > self._spec_seen[name]:
                counter.inc(value - self._spec_seen[name], tags=self._tags)
                self._spec_seen[name] = value
