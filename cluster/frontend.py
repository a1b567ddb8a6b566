"""Frontend: what every ingress does to a request, with no transport in it (the gRPC Router uses it; an HTTP
ingress can sit beside it and reuse it as is).

Admission (a bounded queue), validation and tokenizing, the decode-tier choice (hint, else prompt-length rules),
streaming from the tier's decode replicas, and moving a stream whose replica died (cluster/migration.py). It takes
and returns plain records (cluster/records.py) and raises typed errors; each ingress maps those to its status codes:
InvalidRequestError (names the field), ModelNotFoundError / UnknownTierError, OverloadedError, and from the tiers
TransferFailedError / CodecMismatchError.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
import uuid
from typing import AsyncIterator

from cluster.config import ServeConfig
from cluster.metrics import RouterMetrics
from cluster.migration import REPLICA_LOST, Replay, resume_request
from cluster.records import (Admission, ChatMessage, DecodeRequest, GenerateInput, ModelCard, SamplingInput,
                             StreamChunk, TokenizeInput, TokenizeResult)
from workers.model.loader import load_model_info
from workers.sampling_params import InvalidRequestError, SamplingParams

logger = logging.getLogger(__name__)

MAX_TOKENS_LIMIT = 1 << 20


class OverloadedError(RuntimeError):
    """max_queued_requests are in flight: retry later."""


class ModelNotFoundError(LookupError):
    """The request named a model this deployment does not serve."""


def sampling_params(sampling: SamplingInput) -> SamplingParams:
    """Fields the client left unset take SamplingParams' own defaults (their one home); SamplingParams validates
    the values, and its errors are re-named to the request's field (`sampling.<name>`)."""
    given = {name: value for name, value in dataclasses.asdict(sampling).items() if value is not None}
    if given.get("max_tokens", 0) > MAX_TOKENS_LIMIT:
        raise InvalidRequestError("sampling.max_tokens", f"must be <= {MAX_TOKENS_LIMIT}, got {given['max_tokens']}")
    try:
        return SamplingParams(**given)
    except InvalidRequestError as exc:
        raise InvalidRequestError(f"sampling.{exc.field}", exc.message) from None


def chat_messages(chat: tuple[ChatMessage, ...]) -> list[dict[str, str]]:
    """Validated messages in the form chat templates take."""
    if not chat:
        raise InvalidRequestError("chat.messages", "must contain at least one message")
    for index, message in enumerate(chat):
        if not message.role:
            raise InvalidRequestError(f"chat.messages[{index}].role", "must be a non-empty string")
    return [{"role": message.role, "content": message.content} for message in chat]


class Frontend:
    def __init__(self, config: ServeConfig, decode_handles: list):
        self.config = config
        self.model_config, self.tokenizer, path = load_model_info(config.model or config.engine.model)
        self.model_id = os.path.basename(path.rstrip("/"))
        engine_config = config.engine_config(config.decode_tiers[0])
        self.max_model_len = min(engine_config.max_model_len or self.model_config.max_position_embeddings,
                                 self.model_config.max_position_embeddings)
        # Streaming handles made once: every request of a tier reuses its handle.
        self.decode = {tier.name: handle.options(stream=True)
                       for tier, handle in zip(config.decode_tiers, decode_handles)}
        self.in_flight = 0
        self.num_migrations = 0
        self.metrics = RouterMetrics()

    # ---- admission ----------------------------------------------------------------------------------
    def admit(self, request: GenerateInput) -> Admission:
        """Validate, tokenize and pick the tier; the request then holds a queue slot until `stream` ends."""
        if self.in_flight >= self.config.max_queued_requests:
            raise OverloadedError(f"{self.in_flight} requests in flight (max_queued_requests="
                                  f"{self.config.max_queued_requests}); retry later")
        self.check_model(request.model)
        prompt_token_ids = self._prompt_token_ids(request)
        params = sampling_params(request.sampling)
        tier = self.config.tier_for(len(prompt_token_ids), request.tier).name
        self.in_flight += 1
        self.metrics.queue_depth.set(self.in_flight)
        request_id = request.request_id or uuid.uuid4().hex
        return Admission(DecodeRequest(request_id=request_id, prompt_token_ids=prompt_token_ids, params=params), tier)

    def record_rejection(self, code: str) -> None:
        """Count a refused request under the ingress's name for why (its status code)."""
        self.metrics.rejected.inc(1, tags={"code": code})

    def check_model(self, model: str) -> None:
        if model and model != self.model_id:
            raise ModelNotFoundError(f"model {model!r} is not served here; ListModels gives {self.model_id!r}")

    def _prompt_token_ids(self, request: GenerateInput) -> list[int]:
        if [request.prompt, request.chat, request.token_ids].count(None) != 2:
            raise InvalidRequestError("input", "give one of prompt, chat or token_ids")
        if request.prompt is not None:
            if not request.prompt:
                raise InvalidRequestError("prompt", "must be a non-empty string")
            token_ids = self.tokenizer.encode(request.prompt)
        elif request.chat is not None:
            token_ids = self.tokenizer.encode(self._chat_text(request.chat))
        else:
            token_ids = list(request.token_ids)
            if not token_ids:
                raise InvalidRequestError("token_ids", "must not be empty")
            vocab_size = self.model_config.vocab_size
            bad = next((t for t in token_ids if not 0 <= t < vocab_size), None)
            if bad is not None:
                raise InvalidRequestError("token_ids", f"token id {bad} is outside the vocabulary [0, {vocab_size})")
        if len(token_ids) >= self.max_model_len:
            raise InvalidRequestError("prompt", f"prompt has {len(token_ids)} tokens; the context window is "
                                                f"{self.max_model_len} (prompt + at least one generated token)")
        return token_ids

    def _chat_text(self, chat: tuple[ChatMessage, ...]) -> str:
        return self.tokenizer.apply_chat_template(chat_messages(chat), add_generation_prompt=True)

    # ---- streaming ----------------------------------------------------------------------------------
    async def stream(self, admission: Admission) -> AsyncIterator[StreamChunk]:
        """The admitted request's chunks. A decode replica lost mid-stream: the stream moves to another one and
        the client sees every token once. Closing the stream early (client gone) cancels the decode side."""
        request, tier = admission.request, admission.tier
        started = time.perf_counter()
        first_token_at = None
        generated: list[int] = []
        sent_text: list[str] = []
        migrations = 0
        last_chunk_at = started
        stream = None
        finished = False
        try:
            while True:
                resumed, num_replayed = resume_request(request, generated, self.config.migration_replay_max_tokens)
                stream = self.decode[tier].generate.remote(resumed)
                replay = Replay(num_replayed, "".join(sent_text))
                try:
                    async for output in stream:
                        output = replay.strip(output)
                        if output is None:
                            continue
                        sent_text.append(output.new_text)
                        now = time.perf_counter()
                        if first_token_at is None and output.new_token_ids:
                            first_token_at = now
                            self.metrics.ttft.observe(now - started, tags={"tier": tier})
                        elif output.new_token_ids:
                            self.metrics.inter_token.observe(now - last_chunk_at, tags={"tier": tier})
                        last_chunk_at = now
                        generated.extend(output.new_token_ids)
                        yield StreamChunk(output, tier, ttft_s=(first_token_at or now) - started,
                                          total_s=now - started, prompt_tokens=len(request.prompt_token_ids),
                                          completion_tokens=len(generated))
                        if output.finished:
                            finished = True
                            return
                    return
                except REPLICA_LOST as exc:
                    migrations += 1
                    self.num_migrations += 1
                    self.metrics.migrations.inc(1, tags={"tier": tier})
                    if migrations > self.config.max_migrations or \
                            time.perf_counter() - started > self.config.migration_timeout_s:
                        raise
                    logger.warning("decode replica lost for %s after %d tokens (%r); migrating",
                                   request.request_id, len(generated), exc)
                    await asyncio.sleep(min(0.5 * migrations, 2.0))
        finally:
            # Client cancelled, deadline passed or an error: stop the decode side explicitly so both tiers
            # free the request's blocks now (don't rely on implicit propagation of the cancellation).
            if stream is not None and not finished:
                stream.cancel()
            self.in_flight -= 1
            self.metrics.queue_depth.set(self.in_flight)

    # ---- the rest of the API ------------------------------------------------------------------------
    def tokenize(self, request: TokenizeInput) -> TokenizeResult:
        self.check_model(request.model)
        if request.chat is not None:
            text = self._chat_text(request.chat)
        elif request.prompt:
            text = request.prompt
        else:
            raise InvalidRequestError("prompt", "give a non-empty prompt or chat messages")
        token_ids = self.tokenizer.encode(text)
        return TokenizeResult(token_ids, [self.tokenizer.id_to_token(t) or "" for t in token_ids])

    def model_card(self) -> ModelCard:
        return ModelCard(id=self.model_id, max_model_len=self.max_model_len,
                         vocab_size=self.model_config.vocab_size, tiers=tuple(self.decode))

    def stats(self) -> dict[str, int]:
        return {"in_flight": self.in_flight, "migrations": self.num_migrations}
