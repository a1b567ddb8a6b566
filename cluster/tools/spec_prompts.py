"""The prompt families `bench spec` measures, built from text that ships with Python (no downloads):

- chat: short open questions (little to copy: a lookup drafter's worst case);
- code: "rewrite/extend this function" over real stdlib functions (the answer repeats much of the prompt);
- summarise: "summarise this passage" over the language reference (pydoc_data.topics; quotes and names recur).

Every family yields chat-templated prompt strings, deterministically, as many as asked (cycling through its
sources with a different instruction per lap).
"""

from __future__ import annotations

import inspect
import textwrap

FAMILIES = ("chat", "code", "summarise")

_CHAT_QUESTIONS = (
    "What is the boiling point of water at sea level, and why does it change with altitude?",
    "Explain the difference between a list and a tuple in Python.",
    "Give three tips for writing clear emails.",
    "Why is the sky blue?",
    "What are the main causes of inflation?",
    "Describe how a hash table works.",
    "Write a short poem about the ocean.",
    "What should I pack for a weekend hiking trip?",
)
_CODE_INSTRUCTIONS = (
    "Rewrite this Python function with type hints and a docstring. Keep the logic unchanged.",
    "Add comments to this Python function explaining each step. Return the whole function.",
    "Rename the local variables of this function to clearer names and return the full code.",
    "Convert this function to use f-strings where it formats text; return the complete function.",
)
_SUMMARY_INSTRUCTIONS = (
    "Summarise the following text in a few sentences.",
    "List the key points of the following text.",
)


def _code_sources(max_chars: int = 1400) -> list[str]:
    import json.decoder
    import shlex
    import textwrap as textwrap_module

    functions = [shlex.quote, shlex.join, textwrap_module.dedent, textwrap_module.indent, json.decoder.py_scanstring,
                 inspect.cleandoc, inspect.getmodulename, textwrap_module.shorten]
    sources = []
    for function in functions:
        source = textwrap.dedent(inspect.getsource(function))
        if len(source) <= max_chars:
            sources.append(source)
    return sources


def _passages(count: int = 8, min_chars: int = 600, max_chars: int = 1600) -> list[str]:
    from pydoc_data.topics import topics

    passages = []
    for name in sorted(topics):
        text = topics[name].strip()
        if len(text) >= min_chars:
            passages.append(text[:max_chars])
        if len(passages) == count:
            break
    return passages


def family_prompts(family: str, tokenizer, count: int) -> list[str]:
    """`count` chat-templated prompts of one family."""
    if family == "chat":
        contents = [_CHAT_QUESTIONS[i % len(_CHAT_QUESTIONS)] for i in range(count)]
    elif family == "code":
        sources = _code_sources()
        contents = [f"{_CODE_INSTRUCTIONS[(i // len(sources)) % len(_CODE_INSTRUCTIONS)]}\n\n```python\n"
                    f"{sources[i % len(sources)]}```" for i in range(count)]
    elif family == "summarise":
        passages = _passages()
        contents = [f"{_SUMMARY_INSTRUCTIONS[(i // len(passages)) % len(_SUMMARY_INSTRUCTIONS)]}\n\n"
                    f"{passages[i % len(passages)]}" for i in range(count)]
    else:
        raise ValueError(f"unknown prompt family {family!r}; known: {', '.join(FAMILIES)}")
    return [tokenizer.apply_chat_template([{"role": "user", "content": content}]) for content in contents]
