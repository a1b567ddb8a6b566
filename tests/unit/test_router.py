"""Router (the gRPC ingress over the Frontend): admission and status mapping with fake decode handles (one component,
no Ray cluster)."""

from types import SimpleNamespace

import grpc
import pytest

from cluster.config import ServeConfig, UnknownTierError
from workers.handoff.records import CodecMismatchError, TransferFailedError
from cluster.frontend import ModelNotFoundError, OverloadedError
from cluster.grpc_ingress import Router, _status_for
from protos import inference_pb2 as pb
from workers.sampling_params import InvalidRequestError


class FakeContext:
    def __init__(self):
        self.code, self.details = None, None

    def set_code(self, code):
        self.code = code

    def set_details(self, details):
        self.details = details


@pytest.fixture(scope="module")
def router(tiny_llama_dir):
    config = ServeConfig.model_validate({"model": str(tiny_llama_dir), "max_queued_requests": 2,
                                         "engine": {"max_model_len": 64}})
    fake_handle = SimpleNamespace(options=lambda **options: SimpleNamespace(options=options))
    return Router(config, decode_handles=[fake_handle, fake_handle])


def test_admission_tokenizes_and_routes(router):
    admission = router._admit(pb.GenerateRequest(prompt="the tea", request_id="r1"), FakeContext())
    decode_request, tier = admission.request, admission.tier
    assert tier == "default" and decode_request.request_id == "r1"
    assert decode_request.prompt_token_ids == router.frontend.tokenizer.encode("the tea")
    assert decode_request.params.max_tokens == 256  # server default for an unset field
    router.frontend.in_flight -= 1


def test_overload_is_resource_exhausted_and_bounded(router):
    router.frontend.in_flight = 2
    context = FakeContext()
    with pytest.raises(OverloadedError):
        router._admit(pb.GenerateRequest(prompt="hi"), context)
    assert context.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert router.frontend.in_flight == 2  # a refused request takes no slot
    router.frontend.in_flight = 0


@pytest.mark.parametrize("request_kwargs,field", [
    (dict(prompt=""), "prompt"), (dict(), "input"), (dict(token_ids=pb.TokenIds()), "token_ids"),
    (dict(prompt="the " * 100), "prompt"),  # longer than max_model_len=64
    (dict(prompt="x", sampling=pb.SamplingParams(top_k=-3)), "sampling.top_k"),
])
def test_bad_requests_name_the_field(router, request_kwargs, field):
    context = FakeContext()
    with pytest.raises(InvalidRequestError) as info:
        router._admit(pb.GenerateRequest(**request_kwargs), context)
    assert info.value.field == field and context.code == grpc.StatusCode.INVALID_ARGUMENT
    assert router.frontend.in_flight == 0


@pytest.mark.parametrize("exc,code", [
    (InvalidRequestError("prompt", "x"), grpc.StatusCode.INVALID_ARGUMENT),
    (UnknownTierError("x"), grpc.StatusCode.NOT_FOUND),
    (ModelNotFoundError("x"), grpc.StatusCode.NOT_FOUND),
    (OverloadedError("x"), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (TransferFailedError("x"), grpc.StatusCode.UNAVAILABLE),
    (CodecMismatchError("x"), grpc.StatusCode.FAILED_PRECONDITION),
    (RuntimeError("boom"), grpc.StatusCode.INTERNAL),
])
def test_status_mapping(exc, code):
    assert _status_for(exc) == code
