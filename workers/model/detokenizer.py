"""Streaming token ids -> text deltas without ever emitting half a character.

One token can hold part of a UTF-8 character (emoji and CJK are often split over byte tokens), and
how a token decodes can depend on its neighbours (leading-space rules), so deltas cannot come from
decoding each token alone. As in vLLM, we decode a short window twice -- the tokens whose text is
already out (`prefix`) and the same plus the new ones -- and emit the difference once it no longer
ends in U+FFFD (the replacement char the decoder gives for an incomplete sequence). Only the window
is kept, so a step costs O(window), not O(tokens generated).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from workers.model.tokenizer import Tokenizer

_REPLACEMENT_CHAR = "\ufffd"
# Prompt tokens decoded as context before the first generated one (vLLM uses the same 5).
_PROMPT_CONTEXT_TOKENS = 5
# A UTF-8 char has at most 4 bytes and every token at least 1, so a split char holds back at most
# 3 tokens. A longer hold means the model emitted invalid bytes, whose U+FFFD will never resolve:
# past this many held tokens we release them rather than stall the stream and grow the window.
_MAX_HELD_TOKENS = 8
_MAX_SPLIT_CHAR_TOKENS = 3


class IncrementalDetokenizer:
    """Feed generated ids one at a time with `step`; call `flush` once the stream ends."""

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: Sequence[int] | None = None,
                 skip_special_tokens: bool = False) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        # Window of ids: [0, read_offset) is text already accounted for (emitted, or prompt context),
        # [read_offset, end) is held back. The window starts at the previous emission's tokens, so the
        # next token decodes with its left neighbour (e.g. keeps its leading space).
        self._window: list[int] = list(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:]) if prompt_token_ids else []
        self._read_offset = len(self._window)
        self._prefix_text = self._decode(self._window)
        self._emitted: list[str] = []

    @property
    def text(self) -> str:
        """Everything emitted so far."""
        return "".join(self._emitted)

    def step(self, new_token_id: int) -> str:
        """Text this token completes; "" while a character is still incomplete."""
        self._window.append(new_token_id)
        full_text = self._decode(self._window)
        held = len(self._window) - self._read_offset
        # Growth is required too: a token that decodes to nothing (a skipped special) must not become
        # the next token's only left context, or e.g. a Metaspace leading space would be dropped.
        if len(full_text) > len(self._prefix_text) and not full_text.endswith(_REPLACEMENT_CHAR):
            return self._emit(full_text, len(self._window))
        if held > _MAX_HELD_TOKENS:
            return self._release_invalid_bytes()
        return ""

    def flush(self) -> str:
        """Whatever is still held back at the end of the stream, incomplete character included."""
        if self._read_offset == len(self._window):
            return ""
        return self._emit(self._decode(self._window), len(self._window))

    def _emit(self, window_text: str, cut: int) -> str:
        """Emit the text of window[:cut] beyond the prefix, and slide the window to start there."""
        delta = window_text[len(self._prefix_text):]
        # The tokens just emitted become the next prefix: enough left context, nothing older.
        self._window = self._window[self._read_offset:]
        cut -= self._read_offset
        self._read_offset = cut
        self._prefix_text = self._decode(self._window[:cut])
        if delta:
            self._emitted.append(delta)
        return delta

    def _release_invalid_bytes(self) -> str:
        """The hold is too long to be one split char: emit all but the newest tokens, cutting at the
        latest boundary that ends on a whole char so a genuinely split char at the end survives."""
        end = len(self._window)
        for cut in range(end - 1, max(self._read_offset, end - 1 - _MAX_SPLIT_CHAR_TOKENS), -1):
            text = self._decode(self._window[:cut])
            if not text.endswith(_REPLACEMENT_CHAR):
                return self._emit(text, cut)
        cut = end - _MAX_SPLIT_CHAR_TOKENS
        return self._emit(self._decode(self._window[:cut]), cut)

    def _decode(self, token_ids: Sequence[int]) -> str:
        return self._tokenizer.decode(token_ids, skip_special_tokens=self._skip_special_tokens)
