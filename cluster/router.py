"""Router: the gRPC ingress (methods named as in protos/inference.proto's Inference service).

Validates and tokenizes, picks a decode tier (hint, else prompt-length rules), streams tokens back,
maps errors to gRPC status codes: bad input INVALID_ARGUMENT naming the field, unknown model/tier
NOT_FOUND, overload RESOURCE_EXHAUSTED, a failed handoff under policy `fail` UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator

import grpc
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import ReplicaUnavailableError

from cluster.config import ServeConfig, UnknownTierError
from cluster.metrics import RouterMetrics
from cluster.convert import chat_messages, response_from_output, sampling_params_from_proto
from cluster.records import DecodeRequest
from workers.handoff.records import CodecMismatchError, TransferFailedError
from protos import inference_pb2 as pb
from workers.model.loader import load_model_info
from workers.outputs import RequestOutput
from workers.sampling_params import InvalidRequestError

logger = logging.getLogger(__name__)


class Router:
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

    # ---- RPCs ---------------------------------------------------------------------------------------
    async def Generate(self, request: pb.GenerateRequest, grpc_context=None) -> AsyncIterator[pb.GenerateResponse]:
        decode_request, tier = self._admit(request, grpc_context)
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
                stream, num_replayed = self._decode_stream(tier, decode_request, generated)
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
                        response = response_from_output(output, tier, (first_token_at or now) - started,
                                                        now - started)
                        # Usage is the client's view: its own prompt, every token it has received.
                        response.usage.prompt_tokens = len(decode_request.prompt_token_ids)
                        response.usage.completion_tokens = len(generated)
                        yield response
                        if output.finished:
                            finished = True
                            return
                    return
                except REPLICA_LOST as exc:
                    # The decode replica died mid-stream: re-issue prompt + tokens so far elsewhere.
                    migrations += 1
                    self.num_migrations += 1
                    self.metrics.migrations.inc(1, tags={"tier": tier})
                    if migrations > self.config.max_migrations or \
                            time.perf_counter() - started > self.config.migration_timeout_s:
                        raise
                    logger.warning("decode replica lost for %s after %d tokens (%r); migrating",
                                   decode_request.request_id, len(generated), exc)
                    await asyncio.sleep(min(0.5 * migrations, 2.0))
        except Exception as exc:
            _set_status_for(exc, grpc_context)
            raise
        finally:
            # Client cancelled, deadline passed or an error: stop the decode side explicitly so both tiers
            # free the request's blocks now (don't rely on implicit propagation of the cancellation).
            if stream is not None and not finished:
                stream.cancel()
            self.in_flight -= 1
            self.metrics.queue_depth.set(self.in_flight)

    def _decode_stream(self, tier: str, request: DecodeRequest, generated: list[int]):
        """A stream of the request on a decode replica of `tier`, and how many of its first tokens to skip.

        After a migration (`generated` non-empty) the new replica gets the prompt with the tokens so far forced:
        they are computed one decode step each, through the same kernels as on the lost replica, so a greedy
        (or seeded) stream continues with exactly the tokens an undisturbed run gives. Re-prefilling prompt +
        tokens in one pass is faster but rounds differently and can flip a near-tie (measured: docs/operations);
        it is used only past `migration_replay_max_tokens`."""
        if not generated:
            return self.decode[tier].generate.remote(request), 0
        if len(generated) <= self.config.migration_replay_max_tokens:
            forced = dataclasses.replace(request.params, forced_token_ids=tuple(generated))
            return self.decode[tier].generate.remote(dataclasses.replace(request, params=forced)), len(generated)
        request = dataclasses.replace(
            request, prompt_token_ids=request.prompt_token_ids + generated,
            params=dataclasses.replace(request.params, max_tokens=request.params.max_tokens - len(generated)))
        return self.decode[tier].generate.remote(request), 0

    async def Complete(self, request: pb.GenerateRequest, grpc_context=None) -> pb.CompleteResponse:
        response = pb.CompleteResponse()
        text = []
        async for chunk in self.Generate(request, grpc_context):
            response.request_id = chunk.request_id
            response.token_ids.extend(chunk.token_ids)
            response.logprobs.extend(chunk.logprobs)
            text.append(chunk.text)
            response.finish_reason = chunk.finish_reason
            response.usage.CopyFrom(chunk.usage)
            response.timing.CopyFrom(chunk.timing)
            response.tier = chunk.tier
        response.text = "".join(text)
        return response

    async def Tokenize(self, request: pb.TokenizeRequest, grpc_context=None) -> pb.TokenizeResponse:
        try:
            self._check_model(request.model)
            kind = request.WhichOneof("input")
            if kind == "chat":
                text = self.tokenizer.apply_chat_template(chat_messages(request.chat), add_generation_prompt=True)
            elif kind == "prompt" and request.prompt:
                text = request.prompt
            else:
                raise InvalidRequestError("prompt", "give a non-empty prompt or chat messages")
        except Exception as exc:
            _set_status_for(exc, grpc_context)
            raise
        token_ids = self.tokenizer.encode(text)
        return pb.TokenizeResponse(token_ids=token_ids, tokens=[self.tokenizer.id_to_token(t) or "" for t in token_ids])

    async def ListModels(self, request: pb.ListModelsRequest, grpc_context=None) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[pb.ModelInfo(
            id=self.model_id, max_model_len=self.max_model_len, vocab_size=self.model_config.vocab_size,
            tiers=list(self.decode))])

    async def stats(self) -> dict[str, int]:
        return {"in_flight": self.in_flight, "migrations": self.num_migrations}

    async def Health(self, request: pb.HealthRequest, grpc_context=None) -> pb.HealthResponse:
        return pb.HealthResponse(status=pb.HealthResponse.SERVING, detail=f"{self.in_flight} requests in flight")

    # ---- admission ----------------------------------------------------------------------------------
    def _admit(self, request: pb.GenerateRequest, grpc_context) -> tuple[DecodeRequest, str]:
        try:
            if self.in_flight >= self.config.max_queued_requests:
                raise OverloadedError(f"{self.in_flight} requests in flight (max_queued_requests="
                                      f"{self.config.max_queued_requests}); retry later")
            self._check_model(request.model)
            prompt_token_ids = self._prompt_token_ids(request)
            params = sampling_params_from_proto(request.sampling)
            tier = self.config.tier_for(len(prompt_token_ids), request.tier).name
        except Exception as exc:
            _set_status_for(exc, grpc_context)
            self.metrics.rejected.inc(1, tags={"code": _status_for(exc).name})
            raise
        self.in_flight += 1
        self.metrics.queue_depth.set(self.in_flight)
        request_id = request.request_id or uuid.uuid4().hex
        return DecodeRequest(request_id=request_id, prompt_token_ids=prompt_token_ids, params=params), tier

    def _check_model(self, model: str) -> None:
        if model and model != self.model_id:
            raise ModelNotFoundError(f"model {model!r} is not served here; ListModels gives {self.model_id!r}")

    def _prompt_token_ids(self, request: pb.GenerateRequest) -> list[int]:
        kind = request.WhichOneof("input")
        if kind == "prompt":
            if not request.prompt:
                raise InvalidRequestError("prompt", "must be a non-empty string")
            token_ids = self.tokenizer.encode(request.prompt)
        elif kind == "chat":
            text = self.tokenizer.apply_chat_template(chat_messages(request.chat), add_generation_prompt=True)
            token_ids = self.tokenizer.encode(text)
        elif kind == "token_ids":
            token_ids = list(request.token_ids.ids)
            if not token_ids:
                raise InvalidRequestError("token_ids", "must not be empty")
            vocab_size = self.model_config.vocab_size
            bad = next((t for t in token_ids if not 0 <= t < vocab_size), None)
            if bad is not None:
                raise InvalidRequestError("token_ids", f"token id {bad} is outside the vocabulary [0, {vocab_size})")
        else:
            raise InvalidRequestError("input", "give one of prompt, chat or token_ids")
        if len(token_ids) >= self.max_model_len:
            raise InvalidRequestError("prompt", f"prompt has {len(token_ids)} tokens; the context window is "
                                                f"{self.max_model_len} (prompt + at least one generated token)")
        return token_ids


@dataclass
class Replay:
    """A migrated stream's first outputs re-decode tokens the client already has (teacher-forced): drop them, and
    once they end send the text the client has not seen yet (what the lost replica held back: a partial character,
    a possible stop string), computed on the replayed text as a whole so outputs of any size split right."""

    num_tokens: int
    text_sent: str
    text_replayed: str = ""

    def __post_init__(self) -> None:
        self.done = self.num_tokens == 0

    def strip(self, output: RequestOutput) -> RequestOutput | None:
        if self.done:
            return output
        skipped = min(self.num_tokens, len(output.new_token_ids))
        self.num_tokens -= skipped
        self.text_replayed += output.new_text
        if self.num_tokens > 0 and not output.finished:
            return None
        self.done = True
        text = self.text_replayed[len(self.text_sent):] if self.text_replayed.startswith(self.text_sent) else ""
        return dataclasses.replace(output, new_token_ids=output.new_token_ids[skipped:], new_text=text,
                                   logprobs=output.logprobs[skipped:])


# A replica that vanished mid-stream (killed, OOM, node lost): the request itself is fine, move it.
REPLICA_LOST = (RayActorError, ActorUnavailableError, ReplicaUnavailableError)


class OverloadedError(RuntimeError):
    pass


class ModelNotFoundError(LookupError):
    pass


def _status_for(exc: BaseException) -> grpc.StatusCode:
    if isinstance(exc, (UnknownTierError, ModelNotFoundError)):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(exc, OverloadedError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(exc, TransferFailedError):
        return grpc.StatusCode.UNAVAILABLE
    if isinstance(exc, CodecMismatchError):  # the tiers are misconfigured, not the request
        return grpc.StatusCode.FAILED_PRECONDITION
    if isinstance(exc, ValueError):  # InvalidRequestError, bad chat messages, a template's raise_exception
        return grpc.StatusCode.INVALID_ARGUMENT
    return grpc.StatusCode.INTERNAL


def _set_status_for(exc: BaseException, grpc_context) -> None:
    if grpc_context is None:
        return
    code = _status_for(exc)
    grpc_context.set_code(code)
    grpc_context.set_details(str(exc))
    if code is grpc.StatusCode.INTERNAL:
        logger.exception("internal error", exc_info=exc)
