"""Tokenizer: text <-> token ids for a served model, built from GGUF metadata or a Hugging Face dir.

Both sources end up as one `tokenizers.Tokenizer` (the Rust backend) plus the few facts serving
needs around it: BOS/EOS ids, which ids stop generation, whether to prepend BOS, the chat template.

For GGUF we rebuild the byte-level BPE the way llama.cpp's llama-vocab.cpp does: the vocabulary
and merges come from the file, and the text split before BPE comes from `tokenizer.ggml.pre`,
looked up in `PRE_TOKENIZER_RULES` below. Only byte-level BPE (`tokenizer.ggml.model == "gpt2"`)
is supported; anything else is refused loudly rather than tokenized wrongly.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

from workers.model.chat_template import ChatMessage, render_chat

logger = logging.getLogger(__name__)


class UnsupportedTokenizerError(ValueError):
    """The model's tokenizer is of a kind this module cannot build faithfully."""


# llama.cpp's token types (llama_token_type in llama.h).
_TOKEN_TYPE_CONTROL = 3  # <|im_start|>, <|endoftext|>: special, hidden by skip_special_tokens
_TOKEN_TYPE_USER_DEFINED = 4  # <think>-like: matched whole in text, but shown when decoding

# Texts llama.cpp treats as end-of-generation whatever the metadata says (llama-vocab.cpp,
# special_eog_ids). Only honoured for tokens the file marks as control, so ordinary text never stops.
_END_OF_GENERATION_TEXTS = frozenset({
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|eom_id|>",
    "<EOT>", "_<EOT>", "<|end_of_text|>", "<end_of_utterance>",
})

# llama.cpp's adapted regexes: the contractions are spelled as character classes instead of
# (?i:...) so that Unicode case folding (e.g. 'ſ' ~ 's') cannot change the split.
_LLAMA3_SPLIT_REGEX = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT_REGEX = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _gpt2_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.ByteLevel(add_prefix_space=False)


def _starcoder_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    # Every digit on its own, then GPT-2's split. Same as SmolLM2's original tokenizer.json.
    return pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])


def _regex_split_pre_tokenizer(regex: str) -> Callable[[], pre_tokenizers.PreTokenizer]:
    def build() -> pre_tokenizers.PreTokenizer:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(regex), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])

    return build


@dataclass(frozen=True)
class PreTokenizerRule:
    """How llama.cpp treats text before BPE for one family of `tokenizer.ggml.pre` values."""

    build: Callable[[], pre_tokenizers.PreTokenizer]
    # llama3: a whole pre-token that is already in the vocab is taken as is, merges unused.
    ignore_merges: bool = False
    # llama.cpp's default for prepending BOS when the file has no tokenizer.ggml.add_bos_token.
    add_bos_by_default: bool = False


_GPT2_RULE = PreTokenizerRule(_gpt2_pre_tokenizer)
_STARCODER_RULE = PreTokenizerRule(_starcoder_pre_tokenizer)
_LLAMA3_RULE = PreTokenizerRule(_regex_split_pre_tokenizer(_LLAMA3_SPLIT_REGEX), ignore_merges=True,
                                add_bos_by_default=True)
_QWEN2_RULE = PreTokenizerRule(_regex_split_pre_tokenizer(_QWEN2_SPLIT_REGEX))

# `tokenizer.ggml.pre` -> rule; names grouped as in llama-vocab.cpp. Extend here for new models.
PRE_TOKENIZER_RULES: Mapping[str, PreTokenizerRule] = {
    "default": _GPT2_RULE,
    "gpt2": _GPT2_RULE,
    "smollm": _STARCODER_RULE,
    "starcoder": _STARCODER_RULE,
    "refact": _STARCODER_RULE,
    "command-r": _STARCODER_RULE,
    "codeshell": _STARCODER_RULE,
    "exaone": _STARCODER_RULE,
    "minerva-7b": _STARCODER_RULE,
    "llama3": _LLAMA3_RULE,
    "llama-v3": _LLAMA3_RULE,
    "llama-bpe": _LLAMA3_RULE,
    "falcon3": _LLAMA3_RULE,
    "pixtral": _LLAMA3_RULE,
    "qwen2": _QWEN2_RULE,
    "deepseek-r1-qwen": _QWEN2_RULE,
}


def _pre_tokenizer_rule(pre_name: str | None) -> PreTokenizerRule:
    if pre_name is None:
        return _GPT2_RULE
    rule = PRE_TOKENIZER_RULES.get(pre_name)
    if rule is None:
        logger.warning("Unknown tokenizer.ggml.pre %r; splitting text like GPT-2, which may tokenize "
                       "differently from llama.cpp for this model", pre_name)
        return _GPT2_RULE
    return rule


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the BOS/EOS/stop/chat-template facts serving needs."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token_id: int | None,
        eos_token_id: int | None,
        extra_stop_token_ids: Iterable[int] = (),
        add_bos_token: bool = False,
        add_eos_token: bool = False,
        chat_template: str | None = None,
    ) -> None:
        # Special tokens in user text must always become their ids (the chat template relies on it).
        backend.encode_special_tokens = False
        self._backend = backend
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        stops = set(extra_stop_token_ids)
        if eos_token_id is not None:
            stops.add(eos_token_id)
        self.stop_token_ids: frozenset[int] = frozenset(stops)
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        self.chat_template = chat_template
        self._special_ids = frozenset(
            token_id for token_id, added in backend.get_added_tokens_decoder().items() if added.special)

    # ---- construction ---------------------------------------------------------------------------

    @classmethod
    def from_gguf_metadata(cls, metadata: Mapping[str, Any]) -> Tokenizer:
        """Build from a GGUF file's metadata (as `GGUFReader` field contents)."""
        model_type = metadata.get("tokenizer.ggml.model")
        if model_type != "gpt2":
            raise UnsupportedTokenizerError(
                f"tokenizer.ggml.model {model_type!r} is not supported; only byte-level BPE ('gpt2') is")
        tokens: Sequence[str] = metadata["tokenizer.ggml.tokens"]
        token_types: Sequence[int] = metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        rule = _pre_tokenizer_rule(metadata.get("tokenizer.ggml.pre"))

        vocab = {token: token_id for token_id, token in enumerate(tokens)}
        merges = [_split_merge(merge) for merge in metadata.get("tokenizer.ggml.merges", ())]
        backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=False,
                                                  ignore_merges=rule.ignore_merges))
        backend.pre_tokenizer = rule.build()
        backend.decoder = decoders.ByteLevel()

        # Added tokens are matched whole in the text before BPE sees it. Control tokens are special
        # (dropped by skip_special_tokens); user-defined ones are not, as llama.cpp always renders them.
        backend.add_tokens([
            AddedToken(token, special=token_type == _TOKEN_TYPE_CONTROL, normalized=False)
            for token, token_type in zip(tokens, token_types)
            if token_type in (_TOKEN_TYPE_CONTROL, _TOKEN_TYPE_USER_DEFINED)
        ])

        extra_stops = [metadata[key] for key in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
                       if metadata.get(key) is not None]
        extra_stops += [token_id for token_id, (token, token_type) in enumerate(zip(tokens, token_types))
                        if token_type == _TOKEN_TYPE_CONTROL and token in _END_OF_GENERATION_TEXTS]
        add_bos = metadata.get("tokenizer.ggml.add_bos_token")
        return cls(
            backend,
            bos_token_id=metadata.get("tokenizer.ggml.bos_token_id"),
            eos_token_id=metadata.get("tokenizer.ggml.eos_token_id"),
            extra_stop_token_ids=extra_stops,
            add_bos_token=rule.add_bos_by_default if add_bos is None else bool(add_bos),
            add_eos_token=bool(metadata.get("tokenizer.ggml.add_eos_token", False)),
            chat_template=metadata.get("tokenizer.chat_template"),
        )

    @classmethod
    def from_hf_dir(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Build from a Hugging Face model dir: tokenizer.json plus the optional config files."""
        directory = Path(path)
        backend = tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))
        tokenizer_config = _read_json(directory / "tokenizer_config.json")
        model_configs = [_read_json(directory / "generation_config.json"), _read_json(directory / "config.json")]

        def token_id(config_value: Any, config_key: str) -> int | None:
            text = _special_token_text(config_value)
            if text is not None and backend.token_to_id(text) is not None:
                return backend.token_to_id(text)
            ids = [i for config in model_configs for i in _as_id_list(config.get(config_key))]
            return ids[0] if ids else None

        bos_token_id = token_id(tokenizer_config.get("bos_token"), "bos_token_id")
        eos_token_id = token_id(tokenizer_config.get("eos_token"), "eos_token_id")
        extra_stops = [i for config in model_configs for i in _as_id_list(config.get("eos_token_id"))]

        # Without an explicit flag, the tokenizer.json post-processor says what the model expects:
        # we encode without it (so BOS is never doubled) and add BOS/EOS ourselves.
        post_processed = backend.encode("", add_special_tokens=True).ids
        add_bos = tokenizer_config.get("add_bos_token")
        if add_bos is None:
            add_bos = bool(post_processed) and post_processed[0] == bos_token_id
        add_eos = tokenizer_config.get("add_eos_token")
        if add_eos is None:
            add_eos = bool(post_processed) and post_processed[-1] == eos_token_id and (
                len(post_processed) > 1 or not add_bos)
        return cls(
            backend,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            extra_stop_token_ids=extra_stops,
            add_bos_token=bool(add_bos),
            add_eos_token=bool(add_eos),
            chat_template=_read_hf_chat_template(directory, tokenizer_config),
        )

    def save_hf_dir(self, path: str | os.PathLike[str]) -> None:
        """Write tokenizer.json, tokenizer_config.json and generation_config.json (the stop ids) so that
        from_hf_dir (and transformers) reads this tokenizer back."""
        directory = Path(path)
        directory.mkdir(parents=True, exist_ok=True)
        self._backend.save(str(directory / "tokenizer.json"))
        config = {"bos_token": self._token_text(self.bos_token_id), "eos_token": self._token_text(self.eos_token_id),
                  "add_bos_token": self.add_bos_token, "add_eos_token": self.add_eos_token,
                  "tokenizer_class": "PreTrainedTokenizerFast"}
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
        (directory / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": self.bos_token_id, "eos_token_id": sorted(self.stop_token_ids)}, indent=2))

    # ---- queries --------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce, added tokens included."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def backend(self) -> tokenizers.Tokenizer:
        return self._backend

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary string for an id (byte-level spelling, e.g. 'Ġhello'), None if out of range."""
        if token_id < 0:
            return None
        return self._backend.id_to_token(token_id)

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids

    # ---- encode / decode ------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`. Special-token text inside it always becomes the special id;
        `add_special_tokens` only controls the BOS/EOS this model wants around a sequence."""
        ids = self._backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens:
            if self.add_bos_token and self.bos_token_id is not None:
                ids.insert(0, self.bos_token_id)
            if self.add_eos_token and self.eos_token_id is not None:
                ids.append(self.eos_token_id)
        return ids

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._backend.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: Sequence[Mapping[str, str] | ChatMessage],
                            add_generation_prompt: bool = True, **extra: Any) -> str:
        """The prompt text for a conversation, rendered with this model's chat template."""
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat template; send a plain prompt instead")
        return render_chat(
            self.chat_template, messages, add_generation_prompt=add_generation_prompt,
            bos_token=self._token_text(self.bos_token_id), eos_token=self._token_text(self.eos_token_id), **extra)

    def _token_text(self, token_id: int | None) -> str:
        text = None if token_id is None else self.id_to_token(token_id)
        return text or ""


def _split_merge(merge: str) -> tuple[str, str]:
    left, sep, right = merge.partition(" ")
    if not sep:
        raise ValueError(f"malformed BPE merge {merge!r}: expected 'left right'")
    return left, right


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    with path.open(encoding="utf-8") as file:
        return json.load(file)


def _special_token_text(value: Any) -> str | None:
    """tokenizer_config.json spells a special token as a string or as an AddedToken dict."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _as_id_list(value: Any) -> list[int]:
    """config.json's eos_token_id is an int, a list of ints, or absent."""
    if isinstance(value, bool) or value is None:
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def _read_hf_chat_template(directory: Path, tokenizer_config: Mapping[str, Any]) -> str | None:
    """The default chat template, wherever this transformers version saved it."""
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = tokenizer_config.get("chat_template")
    if template is None:
        template = _read_json(directory / "chat_template.json").get("chat_template")
    if isinstance(template, list):
        # Named templates: [{"name": "default", "template": ...}, {"name": "tool_use", ...}].
        named = {entry.get("name"): entry.get("template") for entry in template if isinstance(entry, Mapping)}
        template = named.get("default", next(iter(named.values()), None))
    return template if isinstance(template, str) else None
