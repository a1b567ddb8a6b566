"""The Frontend with plain records only (no protobuf, no gRPC): what an HTTP ingress would reuse as is."""

import asyncio
from types import SimpleNamespace

import pytest

from cluster.config import ServeConfig, UnknownTierError
from cluster.frontend import Frontend, ModelNotFoundError, OverloadedError, sampling_params
from cluster.records import ChatMessage, GenerateInput, SamplingInput, TokenizeInput
from workers.outputs import RequestOutput
from workers.sampling_params import InvalidRequestError, SamplingParams


class FakeStream:
    """A decode replica's stream: yields the given outputs; records whether the frontend cancelled it."""

    def __init__(self, outputs):
        self.outputs, self.cancelled = outputs, False

    async def __aiter__(self):
        for output in self.outputs:
            yield output

    def cancel(self):
        self.cancelled = True


class FakeHandle:
    def __init__(self):
        self.streams, self.generate = [], SimpleNamespace(remote=self.remote)

    def options(self, **_):
        return self

    def remote(self, request):
        outputs = [RequestOutput(request.request_id, [i + 1], f"t{i}", i == 2, None, len(request.prompt_token_ids),
                                 0, i + 1) for i in range(3)]
        self.streams.append(FakeStream(outputs))
        return self.streams[-1]


@pytest.fixture()
def frontend(tiny_llama_dir):
    config = ServeConfig.model_validate({"model": str(tiny_llama_dir), "max_queued_requests": 1,
                                         "engine": {"max_model_len": 64}})
    return Frontend(config, decode_handles=[FakeHandle(), FakeHandle()])


def test_unset_sampling_fields_take_sampling_params_defaults():
    assert sampling_params(SamplingInput()) == SamplingParams()
    assert sampling_params(SamplingInput(temperature=0.0, max_tokens=5)) == SamplingParams(temperature=0.0,
                                                                                          max_tokens=5)
    with pytest.raises(InvalidRequestError) as info:
        sampling_params(SamplingInput(top_p=2.0))
    assert info.value.field == "sampling.top_p"
    with pytest.raises(InvalidRequestError) as info:
        sampling_params(SamplingInput(max_tokens=1 << 21))
    assert info.value.field == "sampling.max_tokens"


def test_admit_and_stream_plain_records(frontend):
    admission = frontend.admit(GenerateInput(chat=(ChatMessage("user", "hi"),), request_id="r"))
    assert admission.tier == "default" and frontend.in_flight == 1
    with pytest.raises(OverloadedError):  # max_queued_requests=1
        frontend.admit(GenerateInput(prompt="x"))

    async def collect():
        return [chunk async for chunk in frontend.stream(admission)]

    chunks = asyncio.run(collect())
    assert [c.output.new_token_ids for c in chunks] == [[1], [2], [3]]
    assert [c.completion_tokens for c in chunks] == [1, 2, 3] and chunks[-1].tier == "default"
    assert chunks[-1].prompt_tokens == len(admission.request.prompt_token_ids) and frontend.in_flight == 0


def test_closing_a_stream_early_cancels_the_decode_side_and_frees_the_slot(frontend):
    admission = frontend.admit(GenerateInput(prompt="the tea"))

    async def first_chunk_then_close():
        stream = frontend.stream(admission)
        await stream.__anext__()
        await stream.aclose()

    asyncio.run(first_chunk_then_close())
    assert frontend.decode["default"].streams[-1].cancelled and frontend.in_flight == 0


@pytest.mark.parametrize("request_input,error,field", [
    (GenerateInput(), InvalidRequestError, "input"),
    (GenerateInput(prompt="a", token_ids=(1,)), InvalidRequestError, "input"),
    (GenerateInput(chat=()), InvalidRequestError, "chat.messages"),
    (GenerateInput(chat=(ChatMessage("", "x"),)), InvalidRequestError, "chat.messages[0].role"),
    (GenerateInput(token_ids=(10**9,)), InvalidRequestError, "token_ids"),
    (GenerateInput(prompt="x", model="other"), ModelNotFoundError, None),
    (GenerateInput(prompt="x", tier="nope"), UnknownTierError, None),
])
def test_rejections_are_typed_and_take_no_slot(frontend, request_input, error, field):
    with pytest.raises(error) as info:
        frontend.admit(request_input)
    assert field is None or info.value.field == field
    assert frontend.in_flight == 0


def test_tokenize_and_model_card(frontend):
    result = frontend.tokenize(TokenizeInput(prompt="the tea"))
    assert result.token_ids == frontend.tokenizer.encode("the tea") and len(result.tokens) == len(result.token_ids)
    with pytest.raises(InvalidRequestError):
        frontend.tokenize(TokenizeInput(prompt=""))
    card = frontend.model_card()
    assert card.tiers == ("default", "long") and card.max_model_len == 64
