"""Wire messages (tierserve.v1) <-> the frontend's records. Plain mapping, no validation: the frontend validates,
so every ingress rejects the same input with the same message naming the same field."""

from __future__ import annotations

from protos import inference_pb2 as pb
from cluster.records import ChatMessage, GenerateInput, ModelCard, SamplingInput, StreamChunk, TokenizeInput
from workers.sequence import FinishReason

FINISH_REASONS = {
    None: pb.FINISH_REASON_UNSPECIFIED,
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.ABORT: pb.FINISH_REASON_ABORT,
}


def _optional(message, name: str):
    return getattr(message, name) if message.HasField(name) else None


def sampling_from_proto(sampling: pb.SamplingParams) -> SamplingInput:
    """Unset optional fields stay None (the server default applies)."""
    return SamplingInput(
        max_tokens=_optional(sampling, "max_tokens"), temperature=_optional(sampling, "temperature"),
        top_p=_optional(sampling, "top_p"), top_k=_optional(sampling, "top_k"), seed=_optional(sampling, "seed"),
        stop=tuple(sampling.stop), stop_token_ids=tuple(sampling.stop_token_ids), ignore_eos=sampling.ignore_eos,
        logprobs=sampling.logprobs, skip_special_tokens=_optional(sampling, "skip_special_tokens"),
        speculative=_optional(sampling, "speculative"))


def chat_from_proto(chat: pb.ChatMessages) -> tuple[ChatMessage, ...]:
    return tuple(ChatMessage(role=message.role, content=message.content) for message in chat.messages)


def generate_input_from_proto(request: pb.GenerateRequest) -> GenerateInput:
    kind = request.WhichOneof("input")
    return GenerateInput(
        prompt=request.prompt if kind == "prompt" else None,
        chat=chat_from_proto(request.chat) if kind == "chat" else None,
        token_ids=tuple(request.token_ids.ids) if kind == "token_ids" else None,
        sampling=sampling_from_proto(request.sampling), model=request.model, tier=request.tier,
        request_id=request.request_id)


def tokenize_input_from_proto(request: pb.TokenizeRequest) -> TokenizeInput:
    kind = request.WhichOneof("input")
    return TokenizeInput(prompt=request.prompt if kind == "prompt" else None,
                         chat=chat_from_proto(request.chat) if kind == "chat" else None, model=request.model)


def response_from_chunk(chunk: StreamChunk) -> pb.GenerateResponse:
    output = chunk.output
    return pb.GenerateResponse(
        request_id=output.request_id,
        token_ids=output.new_token_ids,
        text=output.new_text,
        finish_reason=FINISH_REASONS[output.finish_reason],
        usage=pb.Usage(prompt_tokens=chunk.prompt_tokens, completion_tokens=chunk.completion_tokens,
                       cached_tokens=output.num_cached_tokens, draft_tokens=output.num_draft_tokens,
                       accepted_draft_tokens=output.num_accepted_tokens),
        timing=pb.Timing(ttft_s=chunk.ttft_s, total_s=chunk.total_s),
        logprobs=[pb.TokenLogprob(token_id=lp.token_id, logprob=lp.logprob,
                                  top=[pb.TopLogprob(token_id=t, logprob=v) for t, v in lp.top])
                  for lp in output.logprobs],
        tier=chunk.tier,
    )


def model_info_from_card(card: ModelCard) -> pb.ModelInfo:
    return pb.ModelInfo(id=card.id, max_model_len=card.max_model_len, vocab_size=card.vocab_size,
                        tiers=list(card.tiers))
