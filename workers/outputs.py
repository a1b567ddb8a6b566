"""What the engine hands back each step, and the per-request text state (detokenizer + stop strings)."""

from __future__ import annotations

from dataclasses import dataclass, field

from workers.model.detokenizer import IncrementalDetokenizer
from workers.model.tokenizer import Tokenizer
from workers.sampling_params import SamplingParams
from workers.sequence import FinishReason, TokenLogprobs


@dataclass(frozen=True)
class RequestOutput:
    """One step's news for one request: the tokens and text since the previous RequestOutput."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_cached_tokens: int
    num_output_tokens: int
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    num_draft_tokens: int = 0  # speculative decoding: drafts verified for the request so far
    num_accepted_tokens: int = 0  # of which accepted


class TextState:
    """Incremental text for one request, with stop strings.

    Text that could still turn out to be the start of a stop string is held back, so a client never
    receives characters that are later cut off.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: list[int], params: SamplingParams):
        self.detokenizer = IncrementalDetokenizer(tokenizer, prompt_token_ids,
                                                  skip_special_tokens=params.skip_special_tokens)
        self.stop = params.stop
        self.include_stop = params.include_stop_str_in_output
        self.hold_back = max((len(s) for s in self.stop), default=1) - 1
        self.text = ""  # everything decoded so far (emitted + held back)
        self.num_emitted_chars = 0

    def add_token(self, token_id: int) -> tuple[str, bool]:
        """Returns (text to emit now, hit a stop string)."""
        delta = self.detokenizer.step(token_id)
        if not delta:
            return "", False
        search_from = max(0, len(self.text) - self.hold_back)
        self.text += delta
        if self.stop:
            hit = _find_stop(self.text, self.stop, search_from)
            if hit is not None:
                index, stop_str = hit
                self.text = self.text[:index + len(stop_str)] if self.include_stop else self.text[:index]
                return self._emit(len(self.text)), True
        return self._emit(max(self.num_emitted_chars, len(self.text) - self.hold_back)), False

    def finish(self) -> str:
        """Everything still held back (end of stream without a stop string)."""
        self.text += self.detokenizer.flush()
        return self._emit(len(self.text))

    def _emit(self, upto: int) -> str:
        chunk = self.text[self.num_emitted_chars:upto]
        self.num_emitted_chars = max(self.num_emitted_chars, upto)
        return chunk


def _find_stop(text: str, stops: tuple[str, ...], search_from: int) -> tuple[int, str] | None:
    best: tuple[int, str] | None = None
    for stop_str in stops:
        index = text.find(stop_str, search_from)
        if index != -1 and (best is None or index < best[0]):
            best = (index, stop_str)
    return best


@dataclass
class Completion:
    """A whole request's result, folded from its RequestOutputs."""

    request_id: str
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finished: bool = False
    finish_reason: FinishReason | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0

    def add(self, output: RequestOutput) -> None:
        self.token_ids.extend(output.new_token_ids)
        self.text += output.new_text
        self.logprobs.extend(output.logprobs)
        self.finished = output.finished
        self.finish_reason = output.finish_reason
        self.num_prompt_tokens = output.num_prompt_tokens
        self.num_cached_tokens = output.num_cached_tokens
        self.num_draft_tokens = output.num_draft_tokens
        self.num_accepted_tokens = output.num_accepted_tokens
