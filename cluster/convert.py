"""Wire messages (tierserve.v1) <-> engine records. Every rejection names the request field."""

from __future__ import annotations

from protos import inference_pb2 as pb
from workers.outputs import RequestOutput
from workers.sampling_params import InvalidRequestError, SamplingParams
from workers.sequence import FinishReason

DEFAULT_MAX_TOKENS = 256
MAX_TOKENS_LIMIT = 1 << 20

FINISH_REASONS = {
    None: pb.FINISH_REASON_UNSPECIFIED,
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.ABORT: pb.FINISH_REASON_ABORT,
}


def sampling_params_from_proto(sampling: pb.SamplingParams) -> SamplingParams:
    """Unset optional fields take server defaults; values are validated by SamplingParams itself."""
    max_tokens = sampling.max_tokens if sampling.HasField("max_tokens") else DEFAULT_MAX_TOKENS
    if max_tokens > MAX_TOKENS_LIMIT:
        raise InvalidRequestError("sampling.max_tokens", f"must be <= {MAX_TOKENS_LIMIT}, got {max_tokens}")
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=sampling.temperature if sampling.HasField("temperature") else 1.0,
            top_p=sampling.top_p if sampling.HasField("top_p") else 1.0,
            top_k=sampling.top_k if sampling.HasField("top_k") else 0,
            seed=sampling.seed if sampling.HasField("seed") else None,
            stop=tuple(sampling.stop),
            stop_token_ids=tuple(sampling.stop_token_ids),
            ignore_eos=sampling.ignore_eos,
            logprobs=sampling.logprobs,
            skip_special_tokens=sampling.skip_special_tokens if sampling.HasField("skip_special_tokens") else True,
        )
    except InvalidRequestError as exc:
        raise InvalidRequestError(f"sampling.{exc.field}", exc.message) from None


def chat_messages(chat: pb.ChatMessages) -> list[dict[str, str]]:
    if not chat.messages:
        raise InvalidRequestError("chat.messages", "must contain at least one message")
    messages = []
    for index, message in enumerate(chat.messages):
        if not message.role:
            raise InvalidRequestError(f"chat.messages[{index}].role", "must be a non-empty string")
        messages.append({"role": message.role, "content": message.content})
    return messages


def response_from_output(output: RequestOutput, tier: str, ttft_s: float, total_s: float) -> pb.GenerateResponse:
    return pb.GenerateResponse(
        request_id=output.request_id,
        token_ids=output.new_token_ids,
        text=output.new_text,
        finish_reason=FINISH_REASONS[output.finish_reason],
        usage=pb.Usage(prompt_tokens=output.num_prompt_tokens, completion_tokens=output.num_output_tokens,
                       cached_tokens=output.num_cached_tokens),
        timing=pb.Timing(ttft_s=ttft_s, total_s=total_s),
        logprobs=[pb.TokenLogprob(token_id=lp.token_id, logprob=lp.logprob,
                                  top=[pb.TopLogprob(token_id=t, logprob=v) for t, v in lp.top])
                  for lp in output.logprobs],
        tier=tier,
    )
