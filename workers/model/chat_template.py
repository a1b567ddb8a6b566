"""Rendering a model's Jinja chat template into prompt text, the way Hugging Face transformers does.

Templates come from model files we do not control, so they run in Jinja's immutable sandbox.
The environment settings and helpers (`raise_exception`, `tojson`, `strftime_now`, loop controls)
match transformers', so a template renders here exactly as it does there.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NoReturn

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


class ChatTemplateError(ValueError):
    """The template itself refused the conversation (via `raise_exception`)."""


def _raise_exception(message: str) -> NoReturn:
    raise ChatTemplateError(f"chat template error: {message}")


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson HTML-escapes '<' and '>', which would corrupt prompts; transformers overrides it too.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


@functools.lru_cache(maxsize=32)
def compile_chat_template(template: str) -> jinja2.Template:
    """Compile once per distinct template text; compiling costs far more than rendering."""
    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[jinja2.ext.loopcontrols])
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = _strftime_now
    return environment.from_string(template)


def render_chat(
    template: str,
    messages: Sequence[Mapping[str, Any] | ChatMessage],
    add_generation_prompt: bool = True,
    bos_token: str = "",
    eos_token: str = "",
    **extra: Any,
) -> str:
    """Prompt text for `messages`; with `add_generation_prompt` it ends where the assistant's turn begins."""
    checked = _validated_messages(messages)
    return compile_chat_template(template).render(
        messages=checked, add_generation_prompt=add_generation_prompt,
        bos_token=bos_token, eos_token=eos_token, **extra)


def _validated_messages(messages: Sequence[Mapping[str, Any] | ChatMessage]) -> list[dict[str, Any]]:
    """Plain dicts for the template (templates index `message['role']`), checked field by field so a
    bad request fails with a message naming the field rather than somewhere inside the template."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError("messages must be a list of {role, content} messages")
    checked: list[dict[str, Any]] = []
    for index, message in enumerate(messages):
        if isinstance(message, ChatMessage):
            fields: dict[str, Any] = {"role": message.role, "content": message.content}
        elif isinstance(message, Mapping):
            fields = dict(message)
        else:
            raise ValueError(f"messages[{index}] must be an object with role and content")
        role = fields.get("role")
        if not isinstance(role, str) or not role:
            raise ValueError(f"messages[{index}].role must be a non-empty string")
        if not isinstance(fields.get("content"), str):
            raise ValueError(f"messages[{index}].content must be a string")
        checked.append(fields)
    return checked
