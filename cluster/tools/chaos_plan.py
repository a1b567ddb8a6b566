"""`tierserve bench chaos`: what to send and what to break, planned up front from the flags (no Ray, no gRPC).

Every scenario is a list of RequestPlans (prompt, length, when the client cancels, what must come back)
and FaultPlans (which deployment's replicas to kill, and when). Planning is pure and seeded, so two runs
with the same flags send the same requests and cancel at the same tokens; only the server's answers differ.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

# What a request must end with: ran to max_tokens, was cancelled by us as planned, or was refused.
EXPECT_OK, EXPECT_CANCELLED, EXPECT_INVALID = "ok", "cancelled", "INVALID_ARGUMENT"

REFERENCE, KILL_DECODE, KILL_PREFILL, CANCEL_STORM, SOAK_BASELINE, SOAK_FAULTY = (
    "reference", "kill-decode", "kill-prefill", "cancel-storm", "soak-baseline", "soak-faulty")
SCENARIOS = (REFERENCE, KILL_DECODE, KILL_PREFILL, CANCEL_STORM, SOAK_BASELINE, SOAK_FAULTY)

PREFILL_DEPLOYMENT = "PrefillServer"
ROUTER_DEPLOYMENT = "Router"


def decode_deployment(tier: str) -> str:
    return f"DecodeServer-{tier}"  # cluster/app.py names each decode tier's deployment so


@dataclass(frozen=True)
class ChaosOptions:
    """Sizes and timings of a chaos run (the CLI flags, validated once here)."""

    streams: int = 8  # reference and kill-decode: concurrent greedy streams
    stream_tokens: int = 96
    prompt_words: int = 48  # words of real text per prompt (~1.3 tokens a word)
    kill_decode_after_s: float = 2.0
    prefill_streams: int = 8
    prefill_kill_after_s: float = 0.3  # handoffs are in flight right after the requests are sent
    prefill_tokens: int = 32
    storm: int = 64
    storm_tokens: int = 64
    storm_cancel_max: int = 40  # every second storm stream is cancelled after 1..this many tokens
    soak_requests: int = 400
    soak_concurrency: int = 32
    soak_tokens: int = 24
    soak_invalid_every: int = 10  # one in this many soak requests has an empty prompt
    soak_cancel_every: int = 7  # one in this many is cancelled by the client
    soak_cancel_after: int = 5
    decode_tier: str = "default"
    ttft_probes: int = 3
    ttft_probe_tokens: int = 8
    drain_timeout_s: float = 5.0  # the target: blocks back to 0 this soon after a scenario
    settle_timeout_s: float = 20.0  # keep polling this long to tell a slow drain from a leak
    recover_timeout_s: float = 120.0  # wait this long for killed replicas to be replaced
    request_timeout_s: float = 300.0  # client deadline per request: a wedged stream ends as DEADLINE_EXCEEDED
    rss_period_s: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("streams", "stream_tokens", "prompt_words", "prefill_streams", "prefill_tokens", "storm",
                     "storm_tokens", "storm_cancel_max", "soak_requests", "soak_concurrency", "soak_tokens",
                     "soak_invalid_every", "soak_cancel_every", "soak_cancel_after", "ttft_probes",
                     "ttft_probe_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("kill_decode_after_s", "prefill_kill_after_s", "drain_timeout_s", "settle_timeout_s",
                     "recover_timeout_s", "request_timeout_s", "rss_period_s"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        # A planned cancel must land mid-stream (streams ignore EOS, so they always reach max_tokens).
        if self.storm_cancel_max >= self.storm_tokens:
            raise ValueError(f"storm_cancel_max ({self.storm_cancel_max}) must be < storm_tokens ({self.storm_tokens})")
        if self.soak_cancel_after >= self.soak_tokens:
            raise ValueError(f"soak_cancel_after ({self.soak_cancel_after}) must be < soak_tokens "
                             f"({self.soak_tokens})")


@dataclass(frozen=True)
class RequestPlan:
    index: int
    prompt: str  # "" is the invalid request (INVALID_ARGUMENT, naming `prompt`)
    max_tokens: int
    cancel_after: int | None  # the client cancels once it has this many tokens
    expect: str  # EXPECT_OK | EXPECT_CANCELLED | EXPECT_INVALID


@dataclass(frozen=True)
class FaultPlan:
    """Kill every replica of `deployment` (as a crash would; Serve replaces them) once a trigger is reached."""

    deployment: str
    after_s: float | None = None  # seconds after the scenario's requests start
    after_finished: int | None = None  # or once this many requests have finished


@dataclass(frozen=True)
class ScenarioPlan:
    name: str
    requests: tuple[RequestPlan, ...]
    concurrency: int
    faults: tuple[FaultPlan, ...] = ()
    compare_to: str | None = None  # same requests as this scenario: count token-identical streams


def greedy_stream(index: int, prompt: str, max_tokens: int, cancel_after: int | None = None) -> RequestPlan:
    return RequestPlan(index=index, prompt=prompt, max_tokens=max_tokens, cancel_after=cancel_after,
                       expect=EXPECT_OK if cancel_after is None else EXPECT_CANCELLED)


def real_prompts(words: list[str], count: int, words_per_prompt: int, start: int) -> list[str]:
    """`count` distinct prompts of `words_per_prompt` consecutive words, the i-th from word start + i * stride
    (wrapping around); distinct as long as count * stride fits in the text."""
    stride = words_per_prompt + 7  # never the same window twice, never aligned with the previous call
    return [" ".join(words[(start + i * stride + j) % len(words)] for j in range(words_per_prompt))
            for i in range(count)]


def soak_requests(options: ChaosOptions, prompts: list[str]) -> tuple[RequestPlan, ...]:
    """One in `soak_invalid_every` has an empty prompt, one in `soak_cancel_every` (of the rest) is cancelled
    after `soak_cancel_after` tokens, the others run to `soak_tokens`."""
    plans = []
    for index, prompt in enumerate(prompts):
        if index % options.soak_invalid_every == options.soak_invalid_every - 1:
            plans.append(RequestPlan(index=index, prompt="", max_tokens=options.soak_tokens, cancel_after=None,
                                     expect=EXPECT_INVALID))
        elif index % options.soak_cancel_every == options.soak_cancel_every - 1:
            plans.append(greedy_stream(index, prompt, options.soak_tokens, options.soak_cancel_after))
        else:
            plans.append(greedy_stream(index, prompt, options.soak_tokens))
    return tuple(plans)


def plan_scenarios(options: ChaosOptions, words: list[str]) -> list[ScenarioPlan]:
    """The whole run, in order. `words` is the real text prompts are cut from (DESIGN §7)."""
    rng = random.Random(options.seed)
    # Disjoint prompt windows per scenario: a prefix-cache hit from an earlier scenario would shorten the
    # prefill (and with it the window in which a handoff can be broken).
    stride = options.prompt_words + 7
    starts, offset = {}, 0
    for name, count in ((REFERENCE, options.streams), (KILL_PREFILL, options.prefill_streams),
                        (CANCEL_STORM, options.storm), (SOAK_BASELINE, options.soak_requests)):
        starts[name] = offset
        offset += count * stride
    reference = tuple(greedy_stream(i, p, options.stream_tokens)
                      for i, p in enumerate(real_prompts(words, options.streams, options.prompt_words,
                                                         starts[REFERENCE])))
    prefill = tuple(greedy_stream(i, p, options.prefill_tokens)
                    for i, p in enumerate(real_prompts(words, options.prefill_streams, options.prompt_words,
                                                       starts[KILL_PREFILL])))
    storm = tuple(greedy_stream(i, p, options.storm_tokens,
                                rng.randint(1, options.storm_cancel_max) if i % 2 == 1 else None)
                  for i, p in enumerate(real_prompts(words, options.storm, options.prompt_words,
                                                     starts[CANCEL_STORM])))
    # The same soak twice (same prompts, same cancels), so the wall-time ratio measures only the faults.
    soak = soak_requests(options, real_prompts(words, options.soak_requests, options.prompt_words,
                                               starts[SOAK_BASELINE]))
    decode = decode_deployment(options.decode_tier)
    return [
        ScenarioPlan(REFERENCE, reference, concurrency=len(reference)),
        ScenarioPlan(KILL_DECODE, reference, concurrency=len(reference),
                     faults=(FaultPlan(decode, after_s=options.kill_decode_after_s),), compare_to=REFERENCE),
        ScenarioPlan(KILL_PREFILL, prefill, concurrency=len(prefill),
                     faults=(FaultPlan(PREFILL_DEPLOYMENT, after_s=options.prefill_kill_after_s),)),
        ScenarioPlan(CANCEL_STORM, storm, concurrency=len(storm)),
        ScenarioPlan(SOAK_BASELINE, soak, concurrency=options.soak_concurrency),
        ScenarioPlan(SOAK_FAULTY, soak, concurrency=options.soak_concurrency,
                     faults=(FaultPlan(decode, after_finished=len(soak) // 2),), compare_to=SOAK_BASELINE),
    ]


def pydoc_words() -> list[str]:
    """The language reference's words (pydoc_data.topics ships with Python), in a fixed order."""
    from pydoc_data.topics import topics

    return " ".join(topics[name] for name in sorted(topics)).split()
