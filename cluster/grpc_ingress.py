"""Router: the gRPC ingress (Serve deployment "Router"; its methods are named as in protos/inference.proto's
Inference service, streaming RPCs are generator methods).

Only the transport lives here: protobuf <-> the frontend's records (cluster/convert.py) and the frontend's typed
errors -> gRPC status codes: bad input INVALID_ARGUMENT naming the field, unknown model/tier NOT_FOUND, overload
RESOURCE_EXHAUSTED, a failed handoff under policy `fail` UNAVAILABLE. Admission, tokenizing, the tier choice and
migration are the Frontend's (cluster/frontend.py), shared with any other ingress.
"""

from __future__ import annotations

import logging
from typing import AsyncIterator

import grpc

from cluster.config import ServeConfig, UnknownTierError
from cluster.convert import (generate_input_from_proto, model_info_from_card, response_from_chunk,
                             tokenize_input_from_proto)
from cluster.frontend import Frontend, ModelNotFoundError, OverloadedError
from cluster.records import Admission
from protos import inference_pb2 as pb
from workers.handoff.records import CodecMismatchError, TransferFailedError

logger = logging.getLogger(__name__)


class Router:
    def __init__(self, config: ServeConfig, decode_handles: list):
        self.frontend = Frontend(config, decode_handles)

    async def Generate(self, request: pb.GenerateRequest, grpc_context=None) -> AsyncIterator[pb.GenerateResponse]:
        admission = self._admit(request, grpc_context)
        # Nothing awaits between admission and the stream's first step: the stream's own `finally` releases the
        # queue slot, and `aclose` below reaches it even when the client goes away between two chunks.
        stream = self.frontend.stream(admission)
        try:
            async for chunk in stream:
                yield response_from_chunk(chunk)
        except Exception as exc:
            _set_status_for(exc, grpc_context)
            raise
        finally:
            await stream.aclose()

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
            result = self.frontend.tokenize(tokenize_input_from_proto(request))
        except Exception as exc:
            _set_status_for(exc, grpc_context)
            raise
        return pb.TokenizeResponse(token_ids=result.token_ids, tokens=result.tokens)

    async def ListModels(self, request: pb.ListModelsRequest, grpc_context=None) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[model_info_from_card(self.frontend.model_card())])

    async def stats(self) -> dict[str, int]:
        return self.frontend.stats()

    async def Health(self, request: pb.HealthRequest, grpc_context=None) -> pb.HealthResponse:
        return pb.HealthResponse(status=pb.HealthResponse.SERVING,
                                 detail=f"{self.frontend.in_flight} requests in flight")

    def _admit(self, request: pb.GenerateRequest, grpc_context) -> Admission:
        try:
            return self.frontend.admit(generate_input_from_proto(request))
        except Exception as exc:
            _set_status_for(exc, grpc_context)
            self.frontend.record_rejection(_status_for(exc).name)
            raise


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
